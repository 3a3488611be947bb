"""ZeRO holds what the planner says it holds: on gloo processes, the bytes of parameters (the sharded
master and FSDP's gathered working copy), gradients and optimizer state each rank holds during a
real step (tensor storages, counted by :mod:`tests.distributed.memory_accounting`) equal the planner's
:func:`loom.planner.memory.state_bytes` for the same plan, for zero 0–3, with gradient accumulation,
under a pipeline, and in fp32, bf16 mixed precision and fp64.

The check can fail: with ZeRO turned into a no-op (``sabotage:zero``: the engine replicates the
dense parameters whatever parallel.zero says, as a sharding bug would) every zero≥1 layout holds
more than planned and the comparison says so (:func:`test_zero_as_a_no_op_is_caught`); zero=0 run
through FSDP's shard group of one instead of DDP holds a second copy of the weights, which the same
comparison catches (:func:`test_zero0_through_fsdp_is_caught`).

Offload is not measured here: on a CPU the host is the device, so FSDP's ``CPUOffloadPolicy`` moves
nothing (a CUDA run would count device bytes apart from host bytes); tests/unit/test_offload_wiring.py
shows the policy reaching every FSDP group, and fails an offload that does not."""

from __future__ import annotations

import pytest

from tests.distributed.memory_accounting import measure_layouts, planned_bytes

PP = ["parallel.pp=2", "parallel.schedule=1f1b", "parallel.microbatches=2"]
LAYOUTS = {
    "dp4_zero0": ["parallel.dp=4"],  # DDP: one copy of weights and gradients
    "dp4_zero0_accum2_bf16": ["parallel.dp=4", "train.grad_accum=2", "train.precision=bf16"],
    "dp4_zero1_accum2": ["parallel.dp=4", "parallel.zero=1", "train.grad_accum=2"],
    "dp4_zero3": ["parallel.dp=4", "parallel.zero=3"],
    "dp2_tp2_zero3_bf16": ["parallel.dp=2", "parallel.tp=2", "parallel.zero=3", "train.precision=bf16"],
    "dp4_zero2_bf16": ["parallel.dp=4", "parallel.zero=2", "train.precision=bf16"],
    "dp2_pp2_zero0": ["parallel.dp=2", *PP],
    "dp2_pp2_zero2": ["parallel.dp=2", "parallel.zero=2", *PP],
    "dp2_pp2_zero3_bf16": ["parallel.dp=2", "parallel.zero=3", "train.precision=bf16", *PP],
    "dp4_zero3_sabotaged": ["parallel.dp=4", "parallel.zero=3", "sabotage:zero"],
    "dp4_zero0_fsdp_sabotaged": ["parallel.dp=4", "sabotage:fsdp_zero0"],
}
COMMON = ["train.precision=fp32"]  # unless a layout sets another (a later key wins)
KINDS = ("params", "grads", "optimizer")


def four_rank_job(tmp_dir: str) -> dict:
    """This suite's part of the session's four-rank job (tests/distributed/shared_job.py)."""
    return measure_layouts({k: [*COMMON, *v] for k, v in LAYOUTS.items()})


@pytest.fixture(scope="module")
def measured(four_rank_job) -> list[dict]:
    return four_rank_job["test_memory_accounting"]


def _mismatches(measured: list[dict], name: str) -> list[str]:
    out = []
    for rank, result in enumerate(measured):
        got = result[name]
        want = planned_bytes([*COMMON, *LAYOUTS[name]], got["plan"], got["pp_rank"])
        for kind in KINDS:
            if got["held"].get(kind, 0) != pytest.approx(want[kind], rel=1e-9):
                out.append(f"rank {rank} {kind}: holds {got['held'].get(kind, 0)} bytes, planned {want[kind]:.0f}")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in LAYOUTS if "sabotaged" not in n])
def test_held_bytes_equal_the_planners(name, measured):
    assert not _mismatches(measured, name), "\n".join(_mismatches(measured, name))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in LAYOUTS if n.endswith("zero3_sabotaged")])
def test_zero_as_a_no_op_is_caught(name, measured):
    wrong = _mismatches(measured, name)
    assert any("optimizer" in w for w in wrong), f"ZeRO made a no-op went unnoticed: {wrong}"


@pytest.mark.slow
def test_zero0_through_fsdp_is_caught(measured):
    """zero=0 as FSDP over a shard group of one (what it was before DDP) holds a second copy of the
    weights: the planner's DDP figures catch it."""
    wrong = _mismatches(measured, "dp4_zero0_fsdp_sabotaged")
    assert any("params" in w for w in wrong), f"a second copy of the weights went unnoticed: {wrong}"
