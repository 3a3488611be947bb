"""A T5 v1.1 imported from a Hugging Face directory under tp2 and pp2: each rank's share of every
parameter is the one-process import's (the relative-bias tables, transposed and shared by a stack's
layers, split by heads under tp; the scaled queries; the output projection of its own, which the
pipeline must not tie to the embedding, on the last stage)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tests.distributed.harness import run_on_ranks  # noqa: E402
from tests.distributed.hf_t5_shards import LAYOUTS, load_cases, loaded  # noqa: E402
from tests.hf_models import t5_dir  # noqa: E402

pytestmark = pytest.mark.slow  # one 2-process job


@pytest.fixture(scope="module")
def t5_dirs(tmp_path_factory) -> dict[str, str]:
    path = tmp_path_factory.mktemp("t5")
    t5_dir(path, ["def f(x):\n    return x\n"] * 30, v1_1=True, n_layer=2, decoder_layers=2)
    return {"t5-v1.1": str(path)}


@pytest.fixture(scope="module")
def results(t5_dirs):
    return run_on_ranks(2, load_cases, t5_dirs)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_rank_imports_the_one_process_parameters(layout, t5_dirs, results):
    model = "t5-v1.1"
    whole = loaded(t5_dirs[model], [])
    seen = set()
    for rank in results:
        for name, p in rank[(model, layout)].items():
            assert torch.equal(p, whole[name]), name
            seen.add(name)
    assert seen == set(whole)  # every parameter is held by some rank
