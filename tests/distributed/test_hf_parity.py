"""A model imported from a Hugging Face directory fine-tunes under every layout as on one process: a
tiny random ``transformers`` GPT-2 (4 blocks, so pipelines split it) trained in float64 under tp2 and
pp2 (each rank reading only its shards of the safetensors file), and with LoRA under pp2, gives the
one-process losses and parameters at the parity suite's tolerance, and the one-process first loss is
``transformers``' loss on the same batch. A reader that forgets its shard's offset (every rank reads
the first rectangle) fails the check."""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("transformers")

from loom.parallel.launch import Process  # noqa: E402
from tests.distributed.harness import run_on_ranks  # noqa: E402
from tests.distributed.hf_parity import BROKEN, LAYOUTS, _train, train_cases, trainer  # noqa: E402
from tests.distributed.parity import RTOL, assert_matches, merge_ranks  # noqa: E402
from tests.hf_models import gpt2_dir  # noqa: E402

pytestmark = pytest.mark.slow  # one 2-process job: about a minute on 2 cores

@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    return str(path), gpt2_dir(path, ["def f(x):\n    return x\n"] * 30, n_layer=4)


@pytest.fixture(scope="module")
def results(gpt2):
    return tuple(run_on_ranks(2, train_cases, gpt2[0], [*LAYOUTS.values(), *BROKEN.values()]))


@functools.cache
def _reference(path: str, *settings: str) -> dict:
    return _train(path, list(settings), Process())


def _got_and_ref(gpt2, results, layout):
    ref = _reference(gpt2[0], *(o for o in layout if o.startswith("train.")))
    return merge_ranks(list(results), tuple(layout)), ref


def test_first_loss_is_transformers_loss_on_the_same_batch(gpt2):
    path, ref_model = gpt2
    t = trainer(path, [], Process())
    batch = t.task.train_batch(0, slice(None))
    with torch.no_grad():
        logits = ref_model.double()(batch["input_ids"]).logits
    theirs = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()).item()
    ours = t.mean_over_replicas(t.train_step(0)[0]).item()
    assert abs(ours - theirs) <= RTOL * theirs, (ours, theirs)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_imported_gpt2_fine_tunes_under_the_layout_as_on_one_process(name, gpt2, results):
    assert_matches(*_got_and_ref(gpt2, results, LAYOUTS[name]))


def test_a_reader_that_ignores_shard_offsets_fails_the_parity_check(gpt2, results):
    got, ref = _got_and_ref(gpt2, results, BROKEN["tp2_reader_ignores_offsets"])
    with pytest.raises(AssertionError):
        assert_matches(got, ref)
