"""The planner against published runs: Megatron-LM's GPT runs on A100s (Narayanan et al. 2021,
Table 1) and PanGu-α 200B on 2048 Ascend 910s (Zeng et al. 2021; the Megatron rows in tests/data/), plus the
search, its inputs and ``loom train --plan``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from loom.config import ConfigError, load_config
from loom.parallel.plan import check_plan, plan_from_config
from loom.planner.cli import plan_settings
from loom.planner.cost import estimate, plan_for_batch
from loom.planner.hardware import parse_cluster
from loom.planner.search import check_fixed, fixed_plan, parse_fix, search

# Megatron-LM's Table 1 rows (published figures, the file names its source), read as given
ANCHOR_FILE = Path(__file__).resolve().parents[1] / "data" / "megatron2021_table1_subset.csv"
FIELDS = ("params_billion", "heads", "hidden", "layers", "tp", "pp", "dp", "gpus", "global_batch", "tflops_per_gpu")


def _anchor_rows() -> list[tuple]:
    rows = csv.DictReader(line for line in ANCHOR_FILE.read_text().splitlines() if not line.startswith("#"))
    return [tuple(float(r[k]) if k == "params_billion" else int(r[k]) for k in FIELDS) for r in rows]


MEGATRON_ROWS = _anchor_rows()


def test_the_anchor_rows_are_whole_layouts():
    assert len(MEGATRON_ROWS) == 5
    for _, heads, hidden, layers, tp, pp, dp, gpus, batch, tflops in MEGATRON_ROWS:
        assert tp * pp * dp == gpus and hidden % heads == 0 and heads % tp == 0 and layers >= pp
        assert batch % dp == 0 and 0 < tflops < 312  # below the A100's bf16 peak


def _megatron(row):
    _, heads, hidden, layers, tp, pp, dp, gpus, batch, _ = row
    cfg = load_config(None, ["model=gpt2-124m", f"model.n_layer={layers}", f"model.n_head={heads}",
                             f"model.n_embd={hidden}", "model.vocab_size=51200", "model.block_size=2048"]).model
    # the paper's runs: full recomputation, micro-batch 1, the interleaved schedule where pp > 1
    v = next((v for v in (2, 3, 4) if (layers // pp) % v == 0), 1) if pp > 1 else 1
    plan = plan_for_batch(batch, 1, dp=dp, tp=tp, pp=pp, recompute="full",
                          schedule="interleaved" if v > 1 else "1f1b", virtual_stages=v)
    return cfg, plan, parse_cluster(f"{gpus}xa100-80g"), batch


@pytest.mark.parametrize("row", MEGATRON_ROWS, ids=[f"{r[0]}B" for r in MEGATRON_ROWS])
def test_published_megatron_layouts_are_predicted_within_15_percent(row):
    cfg, plan, cluster, batch = _megatron(row)
    check_fixed(cfg, plan, cluster, batch)
    e = estimate(cfg, plan, cluster, batch, 2048)
    assert e.fits, f"the published layout must fit: {e.memory_gb_per_device:.1f} GiB"
    assert e.tflops_per_device == pytest.approx(row[9], rel=0.15)
    # the breakdown adds up and every term is a time
    assert sum(e.time_s.values()) == pytest.approx(e.step_time_s)
    assert all(v >= 0 for v in e.time_s.values())


@pytest.mark.parametrize("row", MEGATRON_ROWS, ids=[f"{r[0]}B" for r in MEGATRON_ROWS])
def test_search_finds_a_plan_at_least_as_fast_as_the_published_one(row):
    cfg, plan, cluster, batch = _megatron(row)
    fixed = estimate(cfg, plan, cluster, batch, 2048)
    found = search(cfg, cluster, batch, 2048)
    best = found[0]
    assert best.fits and best.step_time_s <= fixed.step_time_s * (1 + 1e-9)
    assert best.plan.world_size == cluster.devices
    assert best.plan.tp <= 8  # tensor parallelism stays inside a DGX node


def test_pangu_200b_on_2048_ascend_plans_like_the_published_layout():
    """PanGu-α 200B: op-parallel inside each 8-device server, pipeline stages, data parallel with
    sharded optimizer state (published: tp=8, pp=16, dp=16, optimizer sharding, recomputation)."""
    cfg = load_config(None, ["model=pangu-200b"]).model
    cluster = parse_cluster("2048xascend910")
    found = search(cfg, cluster, 1024, 1024)
    fitting = [e for e in found if e.fits]
    assert len(fitting) >= 10
    best = fitting[0].plan
    assert 1 < best.tp <= 8 and best.pp > 1 and best.dp > 1 and best.zero >= 1, fitting[0].describe()
    published = estimate(cfg, plan_for_batch(1024, dp=16, tp=8, pp=16, sp=True, zero=1, recompute="selective"),
                         cluster, 1024, 1024)
    assert published.fits
    # pure data parallelism cannot hold it: 207B parameters × 18 bytes on 32 GB devices
    assert not any(e.fits for e in found if e.plan.tp == 1 and e.plan.pp == 1 and e.plan.zero < 3)


def test_memory_follows_zero_and_recomputation():
    cfg = load_config(None, ["model=gpt3-175b"]).model
    cluster = parse_cluster("1024xa100-80g")
    base = dict(dp=16, tp=8, pp=8, sp=True)
    mem = {z: estimate(cfg, plan_for_batch(1024, **base, zero=z), cluster, 1024, 2048).memory_gb for z in range(4)}
    assert mem[1]["optimizer"] == pytest.approx(mem[0]["optimizer"] / 16)
    # under a pipeline torch's stages keep whole gradients and gathered blocks until the step's end
    # (one reduction per step), so ZeRO-2 and 3 hold what ZeRO-1 does; without one they shard them
    assert mem[2]["grads"] == pytest.approx(mem[1]["grads"]) and mem[3]["weights"] == pytest.approx(mem[2]["weights"])
    flat = dict(dp=128, tp=8, sp=True)
    mem = {z: estimate(cfg, plan_for_batch(1024, **flat, zero=z), cluster, 1024, 2048).memory_gb for z in range(4)}
    assert mem[2]["grads"] < mem[1]["grads"] / 16 and mem[3]["weights"] < mem[2]["weights"]
    act = {r: estimate(cfg, plan_for_batch(1024, **base, recompute=r), cluster, 1024, 2048)
           for r in ("none", "selective", "full")}
    assert act["none"].memory_gb["activations"] > act["selective"].memory_gb["activations"] \
        > act["full"].memory_gb["activations"]
    assert act["full"].time_s["recompute"] > act["selective"].time_s["recompute"] > act["none"].time_s["recompute"] == 0


def test_moe_plans_split_experts_over_ep():
    cfg = load_config(None, ["model=switch-base"]).model
    found = search(cfg, parse_cluster("64xa100-80g"), 256, 512)
    assert found[0].fits and any(e.plan.ep > 1 for e in found)
    e = estimate(cfg, plan_for_batch(256, dp=8, ep=8), parse_cluster("64xa100-80g"), 256, 512)
    assert e.time_s["ep"] > 0


def test_tensor_parallelism_does_not_split_expert_flops():
    """Every tp rank runs the whole MoE layer (experts split over ep, not tp): doubling tp halves a
    dense model's compute per device, but not the experts' share of a sparse one's."""
    cluster = parse_cluster("64xa100-80g")

    def compute(model, tp):
        cfg = load_config(None, [f"model={model}"]).model
        return estimate(cfg, plan_for_batch(256, dp=4, tp=tp), cluster, 256, 512).time_s["compute"]

    assert compute("gpt2-350m", 2) == pytest.approx(compute("gpt2-350m", 1) / 2, rel=0.02)
    assert compute("switch-base", 2) > 0.6 * compute("switch-base", 1)


@pytest.mark.parametrize(("text", "message"), [
    ("tp=8,pp=x", "is not a int"),
    ("tq=8", "is not KEY=VALUE"),
    ("tp", "is not KEY=VALUE"),
    ("pp=2,schedule=zb", "use one of gpipe, 1f1b, interleaved, zero-bubble"),
    ("pp=2,recompute=some", "use one of none, selective, full"),
    ("pp=8,schedule=1f1b,v=2", "runs one stage per rank"),
    ("pp=8,schedule=zero-bubble,v=3", "exactly 2 stages per rank"),
])
def test_bad_fixed_layouts_are_one_line_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_fix(text)


def test_fixed_schedule_follows_from_virtual_stages():
    assert parse_fix("pp=8,v=2")["schedule"] == "interleaved"
    assert parse_fix("pp=8,schedule=zero-bubble")["virtual_stages"] == 2
    assert parse_fix("pp=8,schedule=gpipe") == dict(pp=8, schedule="gpipe", micro_batch=1, vocab_size=0)


def test_fixed_layouts_are_checked_against_cluster_model_and_batch():
    cfg = load_config(None, ["model=gpt2-124m"]).model
    cluster = parse_cluster("16xa100-80g")
    with pytest.raises(ConfigError, match="but the cluster has 16 devices"):
        fixed_plan(cfg, "dp=4", cluster, 64)
    with pytest.raises(ConfigError, match="does not divide model.n_head=12"):
        fixed_plan(cfg, "dp=2,tp=8", cluster, 64)
    with pytest.raises(ConfigError, match="does not split"):
        fixed_plan(cfg, "dp=16", cluster, 24)


@pytest.mark.parametrize(("spec", "message"), [
    ("128xa100", "unknown accelerator 'a100'"),
    ("a100-80g", "write DEVICESxNAME"),
    ("no/such.yaml", "no such file"),
])
def test_bad_clusters_are_one_line_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_cluster(spec)


def test_a_cluster_from_a_yaml_file(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("accelerator: h100-sxm\ndevices: 64\ninter_node_gbps: 200\nmemory_gb: 40\n")
    c = parse_cluster(str(f))
    assert c.devices == 64 and c.nodes == 8
    assert c.accelerator.inter_node_bw == pytest.approx(25e9) and c.accelerator.memory_bytes == 40 * 2**30
    assert c.accelerator.peak_flops == 989e12
    (tmp_path / "bad.yaml").write_text("devices: 8\npeak_tflops: 10\n")
    with pytest.raises(ConfigError, match="missing"):
        parse_cluster(str(tmp_path / "bad.yaml"))


def test_a_chosen_plan_becomes_settings_loom_train_accepts():
    cfg = load_config(None, ["model=gpt-tiny", "model.n_layer=4"]).model
    best = search(cfg, parse_cluster("4xcpu"), 16, 64)[0]
    cfg = load_config(None, ["model=gpt-tiny", "model.n_layer=4"], plan_settings(best.plan, 16))
    check_plan(plan_from_config(cfg), cfg, best.plan.world_size)
    assert cfg.train.batch_size == 16
    for plan in (plan_for_batch(16, 2, dp=2, pp=2), plan_for_batch(16, 2, dp=2, tp=2, sp=True, zero=1),
                 plan_for_batch(16, 1, dp=4)):
        cfg = load_config(None, ["model=gpt-tiny", "model.n_layer=4"], plan_settings(plan, 16))
        # the config says the same plan, and loom train accepts it
        assert plan_from_config(cfg) == plan
        check_plan(plan_from_config(cfg), cfg, plan.world_size)
        assert plan.micro_batch(cfg.train.batch_size) == (2 if plan.tp * plan.pp > 1 else 1)


@pytest.fixture
def loom_logger_restored():
    """``loom.cli.main`` installs its own handler on the ``loom`` logger and stops propagation; put the
    logger back afterwards so that later tests' ``caplog`` still sees loom's warnings."""
    import logging

    logger = logging.getLogger("loom")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved[0], saved[1], saved[2]


def test_plan_json_round_trips_through_the_cli(tmp_path, capsys, loom_logger_restored):
    from loom.cli import main

    out = tmp_path / "plan.json"
    assert main(["plan", "gpt-tiny", "model.n_layer=4", "--cluster", "4xcpu", "--global-batch", "16", "--json",
                 "--out", str(out), "--top", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed) == 3 and {"plan", "step_time_s", "tflops_per_device", "mfu", "memory_gb_per_device"} \
        <= set(printed[0])
    saved = json.loads(out.read_text())
    assert saved["plan"] == printed[0]["plan"] and saved["global_batch"] == 16
    assert main(["plan", "gpt-tiny", "--cluster", "4xcpu", "--global-batch", "16", "--fix", "dp=3"]) == 2
    assert "but the cluster has 4 devices" in capsys.readouterr().err


def test_vocabulary_is_padded_for_tensor_parallelism():
    # GPT-3's 50257 ids split over no tp > 1: the planner pads them to a multiple of 128, as Megatron-LM
    # does, and the plan carries the padded size to `loom train`
    cfg = load_config(None, ["model=gpt3-175b"]).model
    cluster = parse_cluster("1024xa100-80g")
    best = next(e for e in search(cfg, cluster, 1536, 2048) if e.fits)
    assert best.plan.tp > 1 and best.vocab_size == 50304, best.describe()
    assert plan_settings(best.plan, 1536, best.vocab_size)["model.vocab_size"] == 50304
    fixed = fixed_plan(cfg, "dp=16,tp=8,pp=8", cluster, 1536)
    assert fixed.vocab_size == 50304
    # the padded rows cost what they are: more than the unpadded model's head, less than 51200 rows
    plan = plan_for_batch(1536, dp=16, tp=8, pp=8, sp=True)
    padded = estimate(cfg, plan, cluster, 1536, 2048, vocab_size=50304)
    more = estimate(cfg, plan, cluster, 1536, 2048, vocab_size=51200)
    assert padded.params_per_device < more.params_per_device
    with pytest.raises(ConfigError, match="divisible by tp=8"):
        fixed_plan(cfg, "dp=16,tp=8,pp=8,vocab_size=50260", cluster, 1536)
    with pytest.raises(ConfigError, match="at least model.vocab_size"):
        fixed_plan(cfg, "dp=16,tp=8,pp=8,vocab_size=256", cluster, 1536)
    # a divisible vocabulary is left alone
    pangu = load_config(None, ["model=pangu-200b"]).model
    assert fixed_plan(pangu, "dp=16,tp=8,pp=16", parse_cluster("2048xascend910"), 1024).vocab_size == 0


def test_an_unpadded_vocabulary_error_says_how_to_pad():
    cfg = load_config(None, ["model=gpt2-124m", "parallel.tp=8"])
    with pytest.raises(ConfigError, match="model.vocab_size=50304"):
        check_plan(plan_from_config(cfg), cfg, 8)


def test_a_plan_file_of_the_earlier_layout_format_still_trains(tmp_path):
    from loom.planner.cli import read_plan

    old = {"plan": {"dp": 2, "tp": 2, "pp": 1, "ep": 1, "sp": True, "zero": 1, "recompute": "none",
                    "schedule": "1f1b", "virtual_stages": 1, "micro_batch": 2, "vocab_size": 0}, "global_batch": 16}
    (tmp_path / "old.json").write_text(json.dumps(old))
    settings, world = read_plan(tmp_path / "old.json")
    assert world == 4
    cfg = load_config(None, ["model=gpt-tiny"], settings)
    plan = plan_from_config(cfg)
    assert (plan.dp, plan.tp, plan.sp, plan.zero, plan.grad_accum) == (2, 2, True, 1, 4)
    assert plan.micro_batch(cfg.train.batch_size) == 2
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="is not a plan written by"):
        read_plan(tmp_path / "bad.json")
