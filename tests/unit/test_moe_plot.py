"""Pictures of a Mixture-of-Experts run (expert load) and what ``loom describe`` says of an MoE preset."""

import json
import random

import pytest

from loom.plot import _pick_layers, moe_history, plot_expert_load, plot_run

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(run, steps=(2, 4, 6, 8, 10), moe_layers=2, experts=8, top_k=1, with_val=True):
    """A run directory as training leaves it: config.yaml, data.json and metrics.jsonl (MoE records
    when ``moe_layers``), with made-up numbers that drift from imbalance towards balance."""
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  preset: switch-tiny\n")
    (run / "data.json").write_text(json.dumps({"unigram_entropy_nats": 4.2}))
    rng = random.Random(0)
    lines = []
    for i, step in enumerate(steps):
        record = {"step": step, "loss": 6.0 - 0.3 * i, "lr": 1e-3, "tokens_per_s": 1000.0, "mfu": 0.01}
        if moe_layers:
            record["moe"] = []
            for layer in range(moe_layers):
                raw = [rng.random() + (3.0 / (i + 1) if e == layer % experts else 0.0) for e in range(experts)]
                load = [v / sum(raw) for v in raw]
                record["moe"].append({"layer": f"layers.{2 * layer + 1}.mlp", "aux_loss": 0.01 * top_k,
                                      "z_loss": 0.003, "dropped": 0.1 / (i + 1),
                                      "load_max_mean": max(load) * experts, "load": load})
        lines.append(json.dumps(record))
        if with_val and i == len(steps) - 1:
            lines.append(json.dumps({"step": step, "val_loss": 5.0, "val_ppl": 148.4}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def assert_png(path):
    assert path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 1000


def test_moe_run_draws_loss_and_expert_load(tmp_path):
    run = write_run(tmp_path / "run")
    written = plot_run(run)
    assert written == [run / "loss.png", run / "expert_load.png"]
    for path in written:
        assert_png(path)


def test_dense_run_draws_no_expert_load(tmp_path):
    run = write_run(tmp_path / "run", moe_layers=0)
    assert plot_run(run) == [run / "loss.png"]
    assert_png(run / "loss.png")
    assert plot_expert_load(run) is None
    assert not (run / "expert_load.png").exists()


@pytest.mark.parametrize("steps, moe_layers, experts", [
    ((5,), 1, 4),  # a single logged step: one column
    ((1, 2, 3, 10, 20, 40), 13, 64),  # more layers than heatmaps, an uneven log interval
])
def test_expert_load_edge_shapes(tmp_path, steps, moe_layers, experts):
    run = write_run(tmp_path / "run", steps=steps, moe_layers=moe_layers, experts=experts, with_val=False)
    assert_png(plot_expert_load(run, tmp_path / "load.png"))


def test_a_step_logged_twice_keeps_its_last_record(tmp_path):
    a = {"step": 4, "moe": [{"layer": "layers.0.mlp", "dropped": 0.5, "load_max_mean": 2.0, "load": [1.0, 0.0]}]}
    b = {"step": 4, "moe": [{"layer": "layers.0.mlp", "dropped": 0.0, "load_max_mean": 1.0, "load": [0.5, 0.5]}]}
    steps, history = moe_history([{"step": 2, "loss": 1.0}, a, b, {"step": 4, "val_loss": 1.0}])
    assert steps == [4] and history["layers.0.mlp"] == [b["moe"][0]]


def test_many_layers_are_sampled_evenly():
    names = [f"layers.{i}.mlp" for i in range(32)]
    picked = _pick_layers(names)
    assert len(picked) == 8 and picked[0] == names[0] and picked[-1] == names[-1]
    assert _pick_layers(names[:5]) == names[:5]


def test_loom_plot_prints_every_file_written(tmp_path, loom_cli):
    run = write_run(tmp_path / "run")
    out = loom_cli("plot", str(run))[1].split()
    assert out == [str(run / "loss.png"), str(run / "expert_load.png")]
    out = loom_cli("plot", str(run), "--out", str(tmp_path / "curve.png"))[1].split()
    assert out == [str(tmp_path / "curve.png"), str(tmp_path / "curve_expert_load.png")]
    assert_png(tmp_path / "curve_expert_load.png")


def test_describe_an_moe_preset(loom_cli):
    lines = dict(line.split(maxsplit=1) for line in loom_cli("describe", "switch-base")[1].splitlines())
    assert lines["parameters"].startswith("7,393,344,000")
    assert lines["MoE"] == ("12 of 24 blocks (every 2nd block): 128 experts of ffn 3072, router switch, top_k=1, "
                            "capacity factor 1.25")
    assert lines["active"].startswith("195,723,264 (0.196 B) matmul params a token meets")
    assert "N = active matmul params" in lines["FLOPs/token"]


def test_describe_a_dense_preset_has_no_moe_lines(loom_cli):
    out = loom_cli("describe", "gpt-tiny")[1]
    assert "MoE" not in out and "active" not in out
    assert "(training, PaLM's 6N + 12LHQT)\n" in out
