import logging

import pytest
import torch
from torch import nn

from loom.train.precision import LossScaler, autocast


def step_with(scaler, model, opt, grad_value, step):
    loss = (model(torch.ones(1, 4)) ** 2).sum()
    scaler.scale(loss).backward()
    if grad_value is not None:
        model.weight.grad.fill_(grad_value)  # inject an overflow into the gradients
    scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    applied = scaler.step([opt], norm, step)
    opt.zero_grad(set_to_none=True)
    return applied


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_fp16_loss_scaling_skips_a_step_with_inf_or_nan_and_says_so(bad, caplog):
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = LossScaler(torch.device("cpu"), "fp16", init_scale=1024.0)

    assert step_with(scaler, model, opt, None, step=0)  # a good step is applied
    before = [p.detach().clone() for p in model.parameters()]
    scale = scaler.loss_scale
    with caplog.at_level(logging.WARNING, logger="loom.train"):
        applied = step_with(scaler, model, opt, bad, step=1)
    assert not applied
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)  # the weights did not move
    assert scaler.loss_scale == scale / 2  # and the scale backed off
    assert scaler.skipped_steps == 1
    assert "step 1" in caplog.text and "skipped" in caplog.text

    assert step_with(scaler, model, opt, None, step=2)  # training goes on
    assert not any(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


def test_fp16_scaler_state_round_trips():
    a = LossScaler(torch.device("cpu"), "fp16", init_scale=512.0)
    a.skipped_steps = 3
    b = LossScaler(torch.device("cpu"), "fp16")
    b.load_state_dict(a.state_dict())
    assert b.loss_scale == 512.0 and b.skipped_steps == 3


def test_bf16_autocast_runs_matmuls_in_bf16_and_needs_no_scaler():
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    with autocast(torch.device("cpu"), "bf16"):
        assert (x @ w).dtype == torch.bfloat16
    scaler = LossScaler(torch.device("cpu"), "bf16")
    assert not scaler.enabled and scaler.loss_scale == 1.0


def test_fp64_keeps_float64_and_casts_only_upwards():
    from loom.models.common import at_least_fp32
    from loom.train.precision import compute_dtype, param_dtype

    assert param_dtype("fp64") == torch.float64 and param_dtype("bf16") == torch.float32
    assert compute_dtype("fp64") is None and compute_dtype("fp32") is None and compute_dtype("bf16") == torch.bfloat16
    for dtype, want in [(torch.float64, torch.float64), (torch.float32, torch.float32),
                        (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]:
        assert at_least_fp32(torch.ones(2, dtype=dtype)).dtype == want
    with autocast(torch.device("cpu"), "fp64"):
        assert (torch.ones(2, 2, dtype=torch.float64) @ torch.ones(2, 2, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("device, precision, native, said", [
    ("cpu", "bf16", False, True),  # an AVX2-only CPU: torch's bf16 kernels would be emulated
    ("cpu", "fp16", False, True),
    ("cpu", "bf16", True, False),  # AVX-512 BF16 / AMX
    ("cpu", "fp32", False, False),
    ("meta", "bf16", False, False),  # not a CPU
])
def test_low_precision_on_a_cpu_without_its_instructions_is_said_once(device, precision, native, said, monkeypatch,
                                                                     caplog):
    from loom.train import precision as precision_module

    for dtype in (torch.bfloat16, torch.float16):  # this machine's own answers, whatever they are
        assert isinstance(precision_module._cpu_runs_natively(dtype), bool)
    monkeypatch.setattr(precision_module, "_cpu_runs_natively", lambda dtype: native)
    with caplog.at_level(logging.INFO, logger="loom.train"):
        assert precision_module.note_cpu_precision(torch.device(device), precision) is said
    noted = [r.getMessage() for r in caplog.records if "run as fp32 kernels" in r.getMessage()]
    assert len(noted) == int(said)


@pytest.mark.parametrize("precision, said", [("bf16", True), ("fp32", False)])
def test_the_trainer_says_it_at_the_start_of_a_bf16_run(precision, said, monkeypatch, caplog):
    """The note reaches a run: building a bf16 trainer on a CPU that (patched) lacks bf16 instructions."""
    from loom.train import precision as precision_module
    from tests.distributed.parity import process_of_this_rank, trainer

    monkeypatch.setattr(precision_module, "_cpu_runs_natively", lambda dtype: False)
    with caplog.at_level(logging.INFO, logger="loom.train"):
        trainer("gpt", [f"train.precision={precision}"], process_of_this_rank())
    assert any("run as fp32 kernels" in r.getMessage() for r in caplog.records) is said
