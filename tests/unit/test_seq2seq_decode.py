"""Decoding the real encoder-decoder families (Vaswani post-LN with sinusoidal positions; T5 pre-RMSNorm
with relative position bias): the KV cache computes what recomputation computes, greedy and beam,
and beam search scores a hypothesis as the model itself does. float64, so that no near-tie between
two candidates can flip on the last bit of a different summation order."""

import pytest
import torch
import torch.nn.functional as F

from loom.config import load_config
from loom.infer.decode import beam_search, greedy_decode, length_penalty
from loom.infer.seq2seq import decode_texts
from loom.models import build_model, materialize

BOS, EOS, PAD = 1, 2, 0


@pytest.fixture(scope="module", params=["transformer-tiny", "t5-tiny"])
def model(request):
    cfg = load_config(None, [f"model={request.param}", "model.dropout=0.0"]).model
    return materialize(build_model(cfg).to(torch.float64), "cpu", seed=3).eval()


def sources(seed=0, rows=(7, 3, 5, 1)):
    """Right-padded random sources of the given lengths and their mask (True at real tokens)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.full((len(rows), max(rows)), PAD)
    for i, n in enumerate(rows):
        src[i, :n] = torch.randint(3, 200, (n,), generator=g)
    return src, src != PAD


def test_cached_greedy_equals_recomputation(model):
    src, mask = sources()
    cached = greedy_decode(model, src, BOS, EOS, 12, src_mask=mask)
    assert cached == greedy_decode(model, src, BOS, EOS, 12, src_mask=mask, use_cache=False)
    # and each token is the argmax of the whole prefix run again without any cache
    memory, m = model.encode(src, mask)
    for i, row in enumerate(cached):
        prefix = torch.tensor([[BOS, *row]])
        logits = model.decode(prefix, memory[i : i + 1], m[i : i + 1])[0]  # (T, V)
        assert logits[: len(row)].argmax(-1).tolist() == row


def test_cached_beam_search_equals_recomputation(model):
    src, mask = sources(seed=1)
    a = beam_search(model, src, BOS, EOS, 10, beam=3, alpha=0.6, n_best=3, src_mask=mask)
    b = beam_search(model, src, BOS, EOS, 10, beam=3, alpha=0.6, n_best=3, src_mask=mask, use_cache=False)
    assert [[h.tokens for h in x] for x in a] == [[h.tokens for h in x] for x in b]
    for x, y in zip(a, b):
        assert [h.score for h in x] == pytest.approx([h.score for h in y], rel=1e-12)


def test_beam_scores_are_the_models_log_probabilities(model):
    src, mask = sources(seed=2)
    found = beam_search(model, src, BOS, EOS, 8, beam=4, alpha=0.6, n_best=2, src_mask=mask)
    memory, m = model.encode(src, mask)
    for i, hyps in enumerate(found):
        for h in hyps:
            ended = h.tokens + ([EOS] if len(h.tokens) < 8 else [])
            logits = model.decode(torch.tensor([[BOS, *ended[:-1]]]), memory[i : i + 1], m[i : i + 1])[0]
            lp = F.log_softmax(logits, -1).gather(-1, torch.tensor(ended)[:, None]).sum().item()
            assert h.logprob == pytest.approx(lp, rel=1e-10)
            assert h.score == pytest.approx(lp / length_penalty(len(ended), 0.6), rel=1e-10)


def test_a_source_decodes_alike_alone_and_in_a_padded_batch(model):
    src, mask = sources(seed=3)
    rows = [src[i, : int(mask[i].sum())].tolist() for i in range(src.size(0))]
    for beam in (1, 3):
        batched = decode_texts(model, rows, str, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=9, beam=beam,
                               batch_size=4)
        alone = decode_texts(model, rows, str, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=9, beam=beam,
                             batch_size=1)
        assert batched == alone
