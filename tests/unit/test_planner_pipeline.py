"""The planner's pipeline layouts: the schedules the search considers and how it ranks them."""

from __future__ import annotations

import dataclasses

import pytest

from loom.config import load_config
from loom.planner.cost import estimate, plan_for_batch
from loom.planner.hardware import parse_cluster
from loom.planner.search import rank_key, schedules, search

SEQ, BATCH = 1024, 32


@pytest.fixture(scope="module")
def tight_search(tmp_path_factory):
    """gpt2-350m on 8 A100s cut to 12 GB: memory tight enough that holding every micro-batch's
    activations (GPipe) breaks layouts that holding pp of them (1F1B) keeps."""
    cluster = tmp_path_factory.mktemp("cluster") / "tight.yaml"
    cluster.write_text("accelerator: a100-80g\ndevices: 8\nmemory_gb: 12\n")
    cfg = load_config(None, ["model=gpt2-350m"]).model
    return search(cfg, parse_cluster(str(cluster)), BATCH, SEQ)


def test_gpipe_is_searched_for_every_pipeline_and_alone_below_pp_microbatches():
    assert schedules(1, 8, 24) == [("1f1b", 1)]
    assert schedules(4, 8, 24) == [("1f1b", 1), ("interleaved", 2), ("interleaved", 3), ("gpipe", 1)]
    assert schedules(4, 2, 24) == [("gpipe", 1)]  # 1F1B and interleaved need at least pp micro-batches


def test_gpipe_layouts_are_costed_and_lose_to_1f1b_on_memory(tight_search):
    found = tight_search
    rank = {(e.plan, e.vocab_size): i for i, e in enumerate(found)}
    gpipe = [e for e in found if e.plan.schedule == "gpipe"]
    assert gpipe and all(e.plan.pp > 1 for e in gpipe)
    assert any(e.plan.microbatches < e.plan.pp for e in gpipe)  # layouts no other schedule runs
    twins = 0
    rejected = 0
    for g in gpipe:
        key = (dataclasses.replace(g.plan, schedule="1f1b"), g.vocab_size)
        if key not in rank:
            continue
        twins += 1
        f = found[rank[key]]
        # the same bubble and traffic, but GPipe keeps all m micro-batches' activations, 1F1B at most pp
        assert g.step_time_s == f.step_time_s
        assert g.memory_gb["activations"] >= f.memory_gb["activations"]
        assert rank[key] < rank[(g.plan, g.vocab_size)], f"{g.describe()} ranked above {f.describe()}"
        rejected += f.fits and not g.fits
    assert twins and rejected, "some layout must fit under 1F1B and not under GPipe on 12 GB"


def test_a_tie_on_time_prefers_1f1b_over_gpipe_whatever_the_order():
    cfg = load_config(None, ["model=gpt2-350m"]).model
    cluster = parse_cluster("8xa100-80g")
    gpipe, one_f_one_b = (estimate(cfg, plan_for_batch(BATCH, 1, dp=2, pp=4, schedule=s), cluster, BATCH, SEQ)
                          for s in ("gpipe", "1f1b"))
    assert gpipe.step_time_s == one_f_one_b.step_time_s and gpipe.fits and one_f_one_b.fits
    assert sorted([gpipe, one_f_one_b], key=rank_key)[0] is one_f_one_b


def test_plan_fix_refuses_zero_bubble_for_t5_as_loom_train_does(loom_cli):
    """T5's relative position bias crosses stages as an output of its table alone, whose gradient the
    zero-bubble schedule's split backward drops: `loom train` refuses the pair, and so does `loom plan
    --fix`, with the same line."""
    from loom.config import ConfigError
    from loom.parallel.plan import check_plan, resolve_plan

    plan = ["plan", "t5-small", "--cluster", "8xa100-80g", "--global-batch", "64", "--seq", "512", "--fix"]
    code, out, err = loom_cli(*plan, "dp=4,pp=2,schedule=zero-bubble")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    cfg = load_config(None, ["model=t5-small", "parallel.dp=4", "parallel.pp=2", "parallel.schedule=zero-bubble",
                             "parallel.virtual_stages=2", "parallel.microbatches=16", "train.batch_size=64"])
    with pytest.raises(ConfigError) as train_refusal:
        check_plan(resolve_plan(cfg, 8), cfg, 8)
    assert err.strip() == f"loom: error: {train_refusal.value}"
    assert "T5's relative position bias" in err
    # the schedules it can run, and zero-bubble for a model without the carried bias, are evaluated
    assert loom_cli(*plan, "dp=4,pp=2,schedule=1f1b")[0] == 0
    assert loom_cli(*plan, "dp=4,pp=2,schedule=zero-bubble", "model.positions=sinusoidal")[0] == 0


@pytest.mark.parametrize(("sp", "sent_bytes"), [(False, 2 * 2**20), (True, 2**20)])
def test_a_stage_sends_what_each_tp_rank_holds_of_the_stream(sp, sent_bytes):
    """Under tp=2 the residual stream between blocks is a plain tensor on every rank: the whole (b, s, h)
    activation without sequence parallelism, half of the sequence with it; each tp rank sends its own
    to its peer in the next stage. bf16, b=1, s=1024, h=1024: 2 MiB a send, 1 MiB under sp."""
    from loom.planner.comm import link

    cfg = load_config(None, ["model=gpt2-350m"]).model
    cluster = parse_cluster("8xa100-80g")
    plan = plan_for_batch(BATCH, 1, dp=2, tp=2, pp=2, sp=sp)
    e = estimate(cfg, plan, cluster, BATCH, SEQ)
    bw, lat = link(cluster, "send_recv", 2, plan.tp * plan.dp)
    m = plan.microbatches  # 16: one send forward and one backward each
    assert m == 16 and cfg.n_embd == 1024
    assert e.time_s["pp_p2p"] == pytest.approx(m * 2 * (sent_bytes / bw + lat))
