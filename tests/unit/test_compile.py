"""``train.compile``: every block is compiled, and compiled training gives the losses of eager training.

Layouts with compiled blocks (FSDP, tensor + sequence parallel with selective recomputation, a
pipeline) are compared with eager single-process training, float64-exact, in the parity suite
(tests/distributed/test_parity.py: ``COMPILED``, with the aot_eager backend). Here: inductor's own
generated code in one process, fp32, against eager (its fused kernels add in another order, so the
tolerance is fp32 rounding over five steps, not float64's); and a check that compilation happened at
all, which a no-op ``train.compile`` would fail (a parity test alone would not notice one)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from loom.parallel.launch import Process
from tests.distributed.parity import STEPS, assert_matches_roughly, train_single, trainer


def test_every_block_is_compiled_and_names_are_the_eager_models():
    t = trainer("gpt", ["train.compile=true"], Process())
    assert all(b._compiled_call_impl is not None for b in t.model.modules[0].layers.values()), "a block left eager"
    # checkpoints and Hugging Face mappings do not see the compilation
    assert all("_orig_mod" not in n for n, _ in t.model.named_parameters())
    eager = trainer("gpt", [], Process())
    assert all(b._compiled_call_impl is None for b in eager.model.modules[0].layers.values())


@pytest.mark.slow
def test_inductor_training_matches_eager_in_fp32():
    """Inductor generates and builds C++ for the CPU (about a minute here: marked slow)."""
    torch._dynamo.reset()
    counters.clear()
    eager = train_single("gpt", ["train.precision=fp32"])
    assert counters["stats"]["unique_graphs"] == 0
    compiled = train_single("gpt", ["train.precision=fp32", "train.compile=true"])
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    assert len(compiled["losses"]) == STEPS
    assert_matches_roughly(compiled, eager, loss_rtol=2e-6, matrix_rtol=1e-4)
