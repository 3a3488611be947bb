"""`loom generate` and `loom eval` on a seq2seq run, as a user types them (in this process: a tiny
encoder-decoder trained for a few steps on a small {source, target} file)."""

import json

import pytest

from loom.config import load_config
from tests.helpers import train


@pytest.fixture(scope="module")
def seq2seq_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq2seq")
    ops = [("add", "+", "add"), ("sub", "-", "subtract"), ("mul", "*", "multiply"), ("div", "/", "divide")]
    with (root / "pairs.jsonl").open("w") as f:
        for i in range(40):
            name, op, verb = ops[i % 4]
            f.write(json.dumps({"source": f"def {name}_{i}(a, b):\n    return a {op} b",
                                "target": f"{verb} a and b."}) + "\n")
    cfg = load_config(None, ["model=transformer-tiny", f"data.path={root / 'pairs.jsonl'}", "model.vocab_size=300",
                             "train.steps=3", "train.batch_size=8", "train.eval_batches=1", "train.log_every=3",
                             f"train.run_dir={root / 'run'}"])
    train(cfg, root / "run")
    return root / "run"


def test_generate_decodes_greedily_and_by_beam_search(seq2seq_run, loom_cli):
    code, greedy, err = loom_cli("generate", str(seq2seq_run), "--text", "def add_3(a, b):\n    return a + b",
                                 "--max-new-tokens", "6")
    assert code == 0, err
    assert len(greedy.splitlines()) == 1  # one target (three training steps: it may well be empty)
    code, again, _ = loom_cli("generate", str(seq2seq_run), "--text", "def add_3(a, b):\n    return a + b",
                              "--max-new-tokens", "6", "--no-cache")
    assert code == 0 and again == greedy
    code, beams, err = loom_cli("generate", str(seq2seq_run), "--prompt", "def mul_5(a, b):", "--beam", "3",
                                "--n-best", "2", "--max-new-tokens", "6")
    assert code == 0, err
    assert [ln.startswith("--- ") for ln in beams.splitlines()] == [True, False, True, False]


def test_eval_reports_bleu_exact_match_and_the_baselines(seq2seq_run, loom_cli):
    code, out, err = loom_cli("eval", str(seq2seq_run), "--beam", "2", "--examples", "3")
    assert code == 0, err
    result = json.loads(out)
    assert result["examples"] == 3 and result["decoding"] == "beam 2, length penalty alpha 0.6"
    assert 0 <= result["bleu"] <= 100 and 0 <= result["exact_match"] <= 100 and "tok:13a" in result["bleu_signature"]
    assert set(result["baselines"]) == {"copy_source", "most_common_target"}
    # four targets, ten times each: the most common training target is one of them
    assert "a and b" in result["baselines"]["most_common_target"]["target"]
    assert "val_loss" in result and len(result["samples"]) == 3


@pytest.mark.parametrize("args, fragment", [
    (["generate", "RUN"], "give the source with --text"),
    (["generate", "RUN", "--text", "x", "--max-new-tokens", "1000"], "the decoder holds block_size"),
    (["generate", "RUN", "--text", "x", "--beam", "0"], "--beam=0 must be >= 1"),
    (["generate", "RUN", "--text", "x", "--beam", "2", "--n-best", "3"], "--n-best=3 must be between 1 and --beam"),
    (["generate", "RUN", "--text", "x", "--alpha", "-1"], "--alpha=-1.0 must be >= 0"),
    (["eval", "RUN", "--examples", "0"], "--examples=0 >= 1"),
])
def test_bad_decoding_flags_are_one_line_and_exit_code_2(seq2seq_run, args, fragment, loom_cli):
    code, _, err = loom_cli(*[str(seq2seq_run) if a == "RUN" else a for a in args])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], err
