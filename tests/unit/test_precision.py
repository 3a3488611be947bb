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


@pytest.mark.parametrize("device, precision, runs_bf16, said", [
    ("cpu", "bf16", False, True),  # an AVX2-only CPU: emulated bf16, slower than fp32
    ("cpu", "bf16", True, False),  # AVX-512 / AMX
    ("cpu", "fp32", False, False),
    ("meta", "bf16", False, False),  # not a CPU
])
def test_bf16_on_a_cpu_without_bf16_instructions_is_said_once(device, precision, runs_bf16, said, monkeypatch, caplog):
    from loom.train import precision as precision_module

    assert isinstance(precision_module._cpu_runs_bf16(), bool)  # this machine's own answer, whatever it is
    monkeypatch.setattr(precision_module, "_cpu_runs_bf16", lambda: runs_bf16)
    with caplog.at_level(logging.WARNING, logger="loom.train"):
        assert precision_module.warn_slow_cpu_bf16(torch.device(device), precision) is said
    warned = [r.getMessage() for r in caplog.records if "without bf16 instructions" in r.getMessage()]
    assert len(warned) == int(said)
