"""``loom import``, ``loom train train.init_from=DIR`` and ``loom export --format hf`` on a tiny random
``transformers`` GPT-2: the run records where its weights came from, and what comes back out is a
directory ``transformers``' Auto classes load, with the same logits."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from tests.hf_models import VOCAB, gpt2_dir  # noqa: E402

TEXTS = ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n"] * 20


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    return path, gpt2_dir(path, TEXTS)


def test_import_then_export_gives_transformers_the_same_model(gpt2, tmp_path, loom_cli):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, ref = gpt2
    run, out = tmp_path / "run", tmp_path / "hf"
    code, stdout, err = loom_cli("import", str(path), "--out", str(run))
    assert code == 0, err
    assert {"config.yaml", "checkpoints", "tokenizer", "init.json"} <= {p.name for p in run.iterdir()}
    record = json.loads((run / "init.json").read_text())
    assert record["init_from"] == str(path.resolve()) and record["model_type"] == "gpt2"
    code, stdout, err = loom_cli("generate", str(run), "--prompt", "def f", "--max-new-tokens", "5",
                                 "--temperature", "0")
    assert code == 0 and stdout.startswith("def f"), err
    code, stdout, err = loom_cli("export", str(run), "--format", "hf", str(out))
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(x).logits - ref(x).logits).abs().max().item() <= 1e-4
    text = "import os\nprint(x)\n"
    ours, theirs = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(path)
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]


@pytest.mark.slow  # starts 2 processes: about 20 s of CPU
def test_export_by_two_processes_writes_what_one_process_writes(gpt2, tmp_path, loom_cli):
    """``--nproc 2``: each process writes its share of the tensors, merged into the same file."""
    from safetensors.torch import load_file

    path, _ = gpt2
    run = tmp_path / "run"
    assert loom_cli("import", str(path), "--out", str(run))[0] == 0
    for nproc in (1, 2):
        code, _, err = loom_cli("export", str(run), "--format", "hf", str(tmp_path / f"hf{nproc}"),
                                "--nproc", str(nproc))
        assert code == 0, err
    one, two = (load_file(tmp_path / f"hf{n}" / "model.safetensors") for n in (1, 2))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert sorted(p.name for p in (tmp_path / "hf1").iterdir()) == sorted(p.name for p in (tmp_path / "hf2").iterdir())


def test_lora_sft_from_a_hf_directory_records_its_origin_and_exports_merged(gpt2, tmp_path, loom_cli):
    """Fine-tune the imported model with LoRA on {prompt, response} records; the export (adapters
    merged) gives transformers the logits of the un-merged fine-tuned model."""
    from transformers import AutoModelForCausalLM

    from loom.infer.load import load_for_inference

    path, ref = gpt2
    run, out, data = tmp_path / "run", tmp_path / "hf", tmp_path / "sft.jsonl"
    records = [{"prompt": f"def f{i}(x):\n", "response": f"    return x + {i}\n"} for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, _, err = loom_cli("train", f"train.init_from={path}", f"data.path={data}", f"train.run_dir={run}",
                            "train.task=sft", "train.lora.rank=4", "train.lr=0.05", "train.warmup_steps=0",
                            "train.steps=3", "train.batch_size=4", "train.eval_every=3", "train.eval_batches=1",
                            "train.progress=none")
    assert code == 0, err
    assert json.loads((run / "init.json").read_text())["init_from"] == str(path.resolve())
    assert (run / "tokenizer" / "tokenizer.json").read_text() == (path / "tokenizer.json").read_text()
    assert loom_cli("export", str(run), "--format", "hf", "--out", str(out))[0] == 0
    _, tuned, _, _ = load_for_inference(run, device="cpu")  # adapters un-merged
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs, ours, before = exported(x).logits, tuned(x), ref(x).logits
    assert (theirs - ours).abs().max().item() <= 1e-4
    assert (theirs - before).abs().max().item() > 1e-3  # the adapters did change the model


def test_an_imported_run_is_a_run_that_init_from_starts_from(gpt2, tmp_path, loom_cli):
    path, _ = gpt2
    imported, tuned, data = tmp_path / "imported", tmp_path / "tuned", tmp_path / "code.txt"
    data.write_text("def f(x):\n    return x + 1\n" * 200)
    assert loom_cli("import", str(path), "--out", str(imported))[0] == 0
    code, _, err = loom_cli("train", "--resume", str(imported))
    assert code == 2 and "holds imported weights, not a training run to resume" in err, err
    code, _, err = loom_cli("train", f"train.init_from={imported}", f"data.path={data}",  # its model: no model.*
                            f"train.run_dir={tuned}", "train.steps=1", "train.batch_size=2",
                            "train.eval_every=1", "train.eval_batches=1", "train.progress=none")
    assert code == 0, err
    assert "weights loaded, 0 new (-), 0 dropped (-)" in (tuned / "train.log").read_text()


def test_training_from_scratch_with_a_model_directorys_tokenizer(gpt2, tmp_path, loom_cli):
    path, _ = gpt2
    run, data = tmp_path / "run", tmp_path / "code.txt"
    data.write_text("def f(x):\n    return x + 1\n" * 200)
    code, _, err = loom_cli("train", "model=gpt-tiny", f"data.tokenizer={path}", f"data.path={data}",
                            f"train.run_dir={run}", "train.steps=1", "train.batch_size=2", "train.eval_every=1",
                            "train.eval_batches=1", "train.progress=none")
    assert code == 0, err
    assert (run / "tokenizer" / "tokenizer.json").read_text() == (path / "tokenizer.json").read_text()
    assert not (run / "init.json").exists()  # the weights are new: only the tokenizer came from there


@pytest.mark.parametrize("args, fragment", [
    (["train", "train.init_from=/nonexistent"], "is neither a loom run directory (config.yaml, checkpoints/) nor"),
    (["import", "/nonexistent", "--out", "x"], "is not a Hugging Face model directory"),
    (["export", "RUN", "--format", "hf"], "--format hf needs a directory"),
    (["export", "RUN", "OUT", "--nproc", "2"], "--format safetensors writes one file from one process"),
    (["train", "data.tokenizer=/nonexistent"], "data.tokenizer='/nonexistent' is not valid"),
])
def test_bad_hf_paths_are_one_line_and_exit_code_2(args, fragment, loom_cli):
    code, _, err = loom_cli(*args)
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err


def test_a_model_without_a_mapping_is_one_line_on_export(tmp_path, loom_cli):
    from loom.config import config_to_yaml, load_config

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(config_to_yaml(load_config(None, ["model=pangu-tiny"])))
    code, _, err = loom_cli("export", str(tmp_path / "run"), "--format", "hf", str(tmp_path / "hf"))
    assert code == 2 and "model.arch=pangu has no Hugging Face mapping" in err, err
