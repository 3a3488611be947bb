"""Data for loom: corpora, tokenizers, cached token files and batch samplers.

Typical use::

    data = prepare_data(None, vocab_size=4096)  # the Python stdlib as corpus
    sampler = BatchSampler(data.train, block_size=256, batch_size=32, seed=0)
    x, y = sampler.batch(step)
"""

from loom.data.corpus import DataError
from loom.data.dataset import PreparedData, prepare_data
from loom.data.sampler import BatchSampler, eval_batches
from loom.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "BatchSampler",
    "DataError",
    "PreparedData",
    "Tokenizer",
    "eval_batches",
    "load_tokenizer",
    "prepare_data",
]
