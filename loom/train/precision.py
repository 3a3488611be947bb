"""Precision: bf16 or fp16 autocast with fp32 master weights, dynamic loss scaling, and float64.

fp16's narrow range makes small gradients underflow, so the loss is multiplied by a scale before
the backward pass (Micikevicius et al. 2018). ``torch.amp.GradScaler`` does the scaling: when a
step's gradients hold inf or NaN the optimizer step is skipped and the scale halved; after a run of
good steps the scale grows again. bf16 has fp32's range and needs no scaling.

``fp64`` keeps weights, gradients, optimizer state, activations and the loss in float64. It is not
for speed: it is how a layout is shown to compute exactly what one device computes. In float32 the
different summation orders of two layouts leave rounding noise of ~1e-7 per operation, which Adam's
first step turns into full-size updates for elements whose gradient is ~0; in float64 that noise is
~1e-16 and stays far below Adam's epsilon, so two correct layouts agree to ~1e-13 while a real
layout error still shows at full size (docs/testing.md).
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger("loom.train")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
AUTOCAST = ("bf16", "fp16")  # precisions that compute in a lower dtype than the weights are kept in


def param_dtype(precision: str) -> torch.dtype:
    """The dtype the weights (master weights under autocast) and the optimizer state are kept in."""
    return torch.float64 if precision == "fp64" else torch.float32


def compute_dtype(precision: str) -> torch.dtype | None:
    """The dtype the forward computes in when it differs from the weights' (autocast), else None."""
    return DTYPES[precision] if precision in AUTOCAST else None


def warn_slow_cpu_bf16(device: torch.device, precision: str) -> bool:
    """Say once, as a warning, that ``train.precision=bf16`` will train slower than fp32 on a CPU whose
    instructions oneDNN cannot run bf16 matrix multiplies with (an AVX2-only CPU: no AVX-512, no AMX),
    where they are emulated (measured ~15× slower than fp32 on an AVX2 EPYC, benchmarks/RESULTS.md);
    whether it was said."""
    if device.type != "cpu" or precision != "bf16" or _cpu_runs_bf16():
        return False
    log.warning("train.precision=bf16 on a CPU without bf16 instructions (%s; no AVX-512/AMX): its bf16 matrix "
                "multiplies are emulated and run many times slower than fp32 ones here; train.precision=fp32 "
                "trains faster on this machine", torch.backends.cpu.get_cpu_capability())
    return True


def _cpu_runs_bf16() -> bool:
    """Whether oneDNN runs bf16 matrix multiplies natively on this CPU (True where torch cannot tell)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def autocast(device: torch.device, precision: str):
    """The forward-pass context for ``precision``: a no-op for fp32 and fp64."""
    if precision not in AUTOCAST:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


class LossScaler:
    """Dynamic loss scaling for fp16; a transparent pass-through for fp32 and bf16."""

    def __init__(self, device: torch.device, precision: str, init_scale: float = 2.0**16):
        self.enabled = precision == "fp16"
        self.scaler = torch.amp.GradScaler(device.type, init_scale=init_scale, enabled=self.enabled)
        self.skipped_steps = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.unscale_(optimizer)

    def step(self, optimizers: list[torch.optim.Optimizer], grad_norm: torch.Tensor, step: int) -> bool:
        """Step unless the unscaled gradients hold inf/NaN (seen in ``grad_norm``); returns
        whether the step was applied. A skipped step is logged with the new loss scale."""
        if not self.enabled:
            for opt in optimizers:
                opt.step()
            return True
        for opt in optimizers:
            self.scaler.step(opt)
        old = self.scaler.get_scale()
        self.scaler.update()
        applied = bool(torch.isfinite(grad_norm))
        if not applied:
            self.skipped_steps += 1
            log.warning("step %d: fp16 gradients hold inf/NaN; optimizer step skipped, "
                        "loss scale %g -> %g", step, old, self.scaler.get_scale())
        return applied

    @property
    def loss_scale(self) -> float:
        return self.scaler.get_scale() if self.enabled else 1.0

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
