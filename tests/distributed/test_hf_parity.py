"""A model imported from a Hugging Face directory fine-tunes under every layout as on one process: a
tiny random ``transformers`` GPT-2 and Llama (grouped-query attention; 4 blocks each, so pipelines
split them) trained in float64 under tp2 and pp2 (each rank reading only its shards of the
safetensors file), and GPT-2 with LoRA under pp2, give the one-process losses and parameters at the
parity suite's tolerance (and so does supervised fine-tuning, whose replicas and micro-batches score
different numbers of response tokens), and the one-process first loss is ``transformers``' loss on the same batch.
A reader that forgets its shard's offset (every rank reads the first rectangle) fails the check.
LoRA under tensor parallelism (GPT-2 under tp2, Llama under tp2 with sequence parallelism; adapters on
column- and row-parallel layers) matches one process too, changes only the adapters, and splits each
adapter's factors with its weight; factors split as torch's ColwiseParallel splits every parameter
fail that check."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from loom.models.lora import is_lora_param  # noqa: E402
from loom.parallel.launch import Process  # noqa: E402
from tests.distributed.harness import run_on_ranks  # noqa: E402
from tests.distributed.hf_parity import (  # noqa: E402
    BROKEN,
    LAYOUTS,
    LORA_LAYOUTS,
    SFT_FILE,
    _train,
    train_cases,
    trainer,
)
from tests.distributed.parity import RTOL, assert_matches, merge_ranks  # noqa: E402
from tests.hf_models import gpt2_dir, llama_dir  # noqa: E402

pytestmark = pytest.mark.slow  # one 2-process job: about a minute and a half on 2 cores

MODELS = {"gpt2": gpt2_dir, "llama": llama_dir}
ALL_LAYOUTS = {**LAYOUTS, **LORA_LAYOUTS}
LORA_CASES = [("gpt2", "tp2_lora"), ("llama", "tp2_sp_lora")]
CASES = [("gpt2", layout) for layout in LAYOUTS.values()] + [("llama", LAYOUTS["tp2"]), ("llama", LAYOUTS["pp2"])] \
    + [(model, LORA_LAYOUTS[name]) for model, name in LORA_CASES] + [("gpt2", layout) for layout in BROKEN.values()]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict:
    """{model: (directory, transformers model)}."""
    out = {}
    for name, save in MODELS.items():
        path = tmp_path_factory.mktemp(name)
        out[name] = (str(path), save(path, ["def f(x):\n    return x\n"] * 30, n_layer=4))
    records = [{"prompt": f"def f{i}(x):\n" + "    # note\n" * (i % 3), "response": "    return x" + " + 1" * i}
               for i in range(40)]
    (Path(out["gpt2"][0]) / SFT_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


EXPORTED = ("gpt2", LORA_LAYOUTS["tp2_lora"])  # trained under tp2 with LoRA, then exported by both ranks


@pytest.fixture(scope="module")
def export_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("export")
    return root / "run", root / "hf"


@pytest.fixture(scope="module")
def results(hf_dirs, export_dirs):
    return tuple(run_on_ranks(2, train_cases, {k: v[0] for k, v in hf_dirs.items()}, CASES,
                              (*EXPORTED, *map(str, export_dirs))))


@functools.cache
def _reference(path: str, *settings: str) -> dict:
    return _train(path, list(settings), Process())


def _got_and_ref(hf_dirs, results, model, layout):
    ref = _reference(hf_dirs[model][0], *(o for o in layout if o.startswith(("train.", "model."))))
    return merge_ranks(list(results), (model, *layout)), ref


@pytest.mark.parametrize("model", list(MODELS))
def test_first_loss_is_transformers_loss_on_the_same_batch(model, hf_dirs):
    path, ref_model = hf_dirs[model]
    t = trainer(path, [], Process())
    batch = t.task.train_batch(0, slice(None))
    with torch.no_grad():
        logits = ref_model.double()(batch["input_ids"]).logits
    theirs = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()).item()
    ours = t.mean_over_replicas(t.train_step(0)[0]).item()
    assert abs(ours - theirs) <= RTOL * theirs, (ours, theirs)


NAMED = [(m, n) for m, layout in CASES for n, lay in ALL_LAYOUTS.items() if lay == layout]


@pytest.mark.parametrize("model, layout", NAMED)
def test_imported_model_fine_tunes_under_the_layout_as_on_one_process(model, layout, hf_dirs, results):
    assert_matches(*_got_and_ref(hf_dirs, results, model, ALL_LAYOUTS[layout]))


@pytest.mark.parametrize("model, layout", [("gpt2", "tp2"), ("gpt2", "pp2"), ("llama", "tp2"), ("llama", "pp2")])
def test_each_rank_reads_only_its_shards(model, layout, hf_dirs, results):
    """The reads measured: one process reads every stored element once (GPT-2's tied embedding once
    per use); a tp2 or pp2 rank reads about half, never the whole model (LayerNorms, replicated under
    tp, and a pipeline's tied embedding are read by both)."""
    whole = _reference(hf_dirs[model][0])["elements_read"]
    for rank in results:
        part = rank[(model, *LAYOUTS[layout])]["elements_read"]
        assert 0.3 * whole < part < 0.65 * whole, (rank, part, whole)


def test_a_reader_that_ignores_shard_offsets_fails_the_parity_check(hf_dirs, results):
    got, ref = _got_and_ref(hf_dirs, results, "gpt2", BROKEN["tp2_reader_ignores_offsets"])
    with pytest.raises(AssertionError):
        assert_matches(got, ref)


@pytest.mark.parametrize("model, layout", LORA_CASES)
def test_lora_under_tensor_parallelism_trains_only_the_adapters(model, layout, hf_dirs, results):
    got, _ = _got_and_ref(hf_dirs, results, model, LORA_LAYOUTS[layout])
    adapters = sorted(n for n in got["params"] if is_lora_param(n))
    assert adapters and got["moved"] == adapters


def assert_adapters_split_with_their_weights(rank_result: dict, full: dict) -> None:
    """Each rank holds, of a column-parallel layer (its weight's outputs split), A whole and B's
    rows (outputs) split as the weight's; of a row-parallel layer (inputs split), A's columns
    (inputs) split as the weight's and B whole. (DTensor computes the right numbers under any
    placement of the factors, so this, not the losses, is what a wrong split changes.)"""
    shapes = rank_result["local_shapes"]
    for name in (n for n in shapes if n.endswith(".lora_a")):
        owner = name.removesuffix(".lora_a")
        out, inp = full[f"{owner}.weight"].shape
        w, a, b = shapes[f"{owner}.weight"], shapes[name], shapes[f"{owner}.lora_b"]
        r = full[name].shape[0]
        if w[0] < out:  # column-parallel
            assert (a, b) == ((r, inp), (w[0], r)), f"{owner}: weight {w}, A {a}, B {b}"
        else:
            assert w[1] < inp and (a, b) == ((r, w[1]), (out, r)), f"{owner}: weight {w}, A {a}, B {b}"


@pytest.mark.parametrize("model, layout", LORA_CASES)
def test_lora_factors_are_split_with_their_weights(model, layout, hf_dirs, results):
    full = _reference(hf_dirs[model][0], *LORA_LAYOUTS[layout][-2:])["params"]
    for rank in results:
        assert_adapters_split_with_their_weights(rank[(model, *LORA_LAYOUTS[layout])], full)


def test_lora_factors_split_like_their_weights_fail_the_split_check(hf_dirs, results):
    layout = BROKEN["tp2_lora_split_as_weight"]
    full = _reference(hf_dirs["gpt2"][0], *(o for o in layout if o.startswith("train.")))["params"]
    with pytest.raises(AssertionError):
        assert_adapters_split_with_their_weights(results[0][("gpt2", *layout)], full)
    assert_matches(*_got_and_ref(hf_dirs, results, "gpt2", layout))  # the numbers are right all the same


def test_a_run_trained_under_tp2_exported_by_two_ranks_loads_in_transformers(hf_dirs, results, export_dirs):
    """The LoRA run trained under tp2, exported by both ranks (each writing about half of every weights
    file, consolidated into several files and their index): ``AutoModelForCausalLM`` gives the logits of
    loom's model with its adapters un-merged."""
    from transformers import AutoModelForCausalLM

    from loom.infer.load import load_for_inference

    run, out = export_dirs
    wrote = [r["export"] for r in results]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    total, files = index["metadata"]["total_size"], set(index["weight_map"].values())
    assert sum(w["bytes"] for w in wrote) == total and all(0.3 * total < w["bytes"] < 0.7 * total for w in wrote)
    assert len(files) > 1 and files == {f.name for f in out.glob("*.safetensors")} and not (out / "sharded").exists()
    _, ours, _, step = load_for_inference(run, device="cpu")
    assert step == 2 and any(is_lora_param(n) for n, _ in ours.named_parameters())
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    assert theirs.dtype == torch.float64
    x = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, before = theirs(x).logits, ours(x), hf_dirs["gpt2"][1].double()(x).logits
    assert (got - want).abs().max().item() <= 1e-10
    assert (got - before).abs().max().item() > 1e-6  # the adapters did change the model
