"""Pipeline parallelism on 2 gloo processes gives the loss, the gradients and the training steps of
the single-process model, for every schedule and both architectures."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from loom.config import load_config
from loom.models import build_model, materialize, spec_of
from loom.parallel.pipeline import build_pipeline
from loom.tasks import lm_loss
from tests.distributed.parity import ATOL, RTOL

SEED = 0
# (preset, schedule, virtual_stages, microbatches, batch)
CASES = [
    ("gpt-tiny", "gpipe", 1, 2, 4),
    ("gpt-tiny", "1f1b", 1, 4, 8),
    ("gpt-tiny", "interleaved", 2, 2, 4),
    ("gpt-tiny", "zero-bubble", 2, 4, 8),
    ("pangu-tiny", "gpipe", 1, 4, 8),
    ("pangu-tiny", "1f1b", 1, 2, 4),
    ("pangu-tiny", "interleaved", 2, 4, 8),
    ("pangu-tiny", "zero-bubble", 2, 2, 4),
]


def _cfg(preset: str):
    n_layer = 5 if preset.startswith("pangu") else 4  # 4 blocks: enough for pp=2 × virtual_stages=2
    return load_config(None, [f"model={preset}", f"model.n_layer={n_layer}", "model.block_size=16"]).model


def _check_case(preset, schedule, v, microbatches, batch) -> dict:
    """Run one case on this rank; return the mismatches found (none when all agree) and the layout."""
    cfg = _cfg(preset)
    errors: list[str] = []
    ref = materialize(build_model(cfg).double(), "cpu", SEED)  # float64, as the parity suite
    pipe = build_pipeline(build_model(cfg).double(), spec_of(cfg).pipeline_split(cfg), dist.group.WORLD,
                          schedule=schedule, microbatches=microbatches, virtual_stages=v, loss_fn=lm_loss, device="cpu")
    for m in pipe.modules:  # the same weights as the single-process model, loaded by name
        m.to_empty(device="cpu")
    pipe.tie_weights()
    for m in pipe.modules:
        missing, _ = m.load_state_dict(ref.state_dict(), strict=False)
        errors += [f"{k} missing from the reference" for k in missing]

    gen = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=gen),
             torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=gen)) for _ in range(4)]

    def close(what, got, want):
        try:
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
        except AssertionError as e:
            errors.append(f"{what}: {str(e).splitlines()[1:4]}")

    # one step: loss and every gradient
    x, y = data[0]
    loss = pipe.step((x,), y)
    pipe.sync_tied_grads()
    ref_loss = lm_loss(ref(x), y)
    ref_loss.backward()
    if pipe.is_last:
        close("loss", loss, ref_loss.detach())
    ref_params = dict(ref.named_parameters())
    params = {n: p for m in pipe.modules for n, p in m.named_parameters()}  # one entry per name
    for name, p in params.items():
        close(f"grad {name}", p.grad, ref_params[name].grad)
    expected = {n for n in ref_params if n.startswith("layers.")}
    held = {n for n in params if n.startswith("layers.")}
    blocks = [sorted({n.split(".")[1] for n in m.state_dict() if n.startswith("layers.")}) for m in pipe.modules]
    tied = len({id(m.tok_emb.weight) for m in pipe.modules if hasattr(m, "tok_emb")})  # distinct copies here

    # three optimizer steps keep the losses of the single-process model (SGD: Adam's first step moves
    # every weight by ±lr whatever its gradient's size, so rounding noise on a ~0 gradient would show)
    unique = list({id(p): p for m in pipe.modules for p in m.parameters()}.values())
    opt = torch.optim.SGD(unique, lr=0.5, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    for step, (x, y) in enumerate(data[1:]):
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
        loss = pipe.step((x,), y)
        pipe.sync_tied_grads()
        ref_loss = lm_loss(ref(x), y)
        ref_loss.backward()
        if pipe.is_last:
            close(f"loss after {step + 1} steps", loss, ref_loss.detach())
    return dict(errors=errors, held=held, expected=expected, blocks=blocks, stages=pipe.stage_ids, tied=tied)


def worker(cases) -> list:
    out = []
    for case in cases:
        t0 = time.perf_counter()
        out.append(_check_case(*case) | dict(seconds=time.perf_counter() - t0))
    return out


def two_rank_job(tmp_dir: str) -> list:
    """This suite's part of the session's two-rank job (tests/distributed/shared_job.py)."""
    return worker(CASES)


@pytest.mark.slow
def test_pipeline_matches_single_process(two_rank_job):
    ranks = two_rank_job["test_pipeline"]
    for i, case in enumerate(CASES):
        results = [r[i] for r in ranks]
        for rank, res in enumerate(results):
            assert not res["errors"], f"{case} rank {rank}: {res['errors']}"
        assert set().union(*(r["held"] for r in results)) == results[0]["expected"], case  # every block, once
        assert sum(len(r["held"]) for r in results) == len(results[0]["expected"]), case
        for rank, res in enumerate(results):
            assert all(b for b in res["blocks"]), f"{case}: rank {rank} holds an empty stage"
    schedule_stages = {c[1]: [r[i]["stages"] for r in ranks] for i, c in enumerate(CASES)}
    assert schedule_stages["gpipe"] == [[0], [1]]
    assert schedule_stages["interleaved"] == [[0, 2], [1, 3]]
    assert schedule_stages["zero-bubble"] == [[0, 3], [1, 2]]
    zb = CASES.index(("gpt-tiny", "zero-bubble", 2, 4, 8))
    assert ranks[0][zb]["tied"] == 1, "ZB-V: the first and last stages on rank 0 share one embedding Parameter"
