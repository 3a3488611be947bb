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

On a CPU without bf16/fp16 instructions (AVX2 only) torch's low-precision matrix kernels are emulated,
many times slower than fp32 ones; there the autocast context also computes the matrix products and
the attention with fp32 kernels on the low-precision operands (:class:`Fp32Products`), which gives a
native kernel's numbers at close to fp32's speed.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
from torch.utils._python_dispatch import TorchDispatchMode

log = logging.getLogger("loom.train")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
AUTOCAST = ("bf16", "fp16")  # precisions that compute in a lower dtype than the weights are kept in


def param_dtype(precision: str) -> torch.dtype:
    """The dtype the weights (master weights under autocast) and the optimizer state are kept in."""
    return torch.float64 if precision == "fp64" else torch.float32


def compute_dtype(precision: str) -> torch.dtype | None:
    """The dtype the forward computes in when it differs from the weights' (autocast), else None."""
    return DTYPES[precision] if precision in AUTOCAST else None


@functools.cache
def _cpu_runs_natively(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs ``dtype`` (bf16, fp16) matrix multiplies with this CPU's own instructions
    (AVX-512 BF16/FP16, AMX); True where torch cannot tell."""
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return True


_aten = torch.ops.aten
# products whose every output has the operands' dtype
_PRODUCTS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default}
if hasattr(_aten, "_grouped_mm"):
    _PRODUCTS.add(_aten._grouped_mm.default)
# the out= forms compiled code calls (inductor's extern kernels) -> their functional forms
_OUT_FORMS = {_aten.mm.out: _aten.mm.default, _aten.addmm.out: _aten.addmm.default,
              _aten.bmm.out: _aten.bmm.default, _aten.baddbmm.out: _aten.baddbmm.default}
# attention: output number -> whether it has the operands' dtype (the log-sum-exp stays fp32)
_ATTENTION = {
    _aten._scaled_dot_product_flash_attention_for_cpu.default: (True, False),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward.default: (True, True, True),
}


class Fp32Products(TorchDispatchMode):
    """Matrix products (and CPU attention) of ``dtype`` operands computed by fp32 kernels, their
    results rounded back to ``dtype``: for a CPU whose instructions cannot multiply bf16/fp16 (AVX2
    only), where torch's own kernels for them are emulated and measured ~15-45x slower than fp32 ones.

    The numbers are those of a native low-precision kernel: a product of two bf16 (fp16) numbers is
    exact in fp32, native kernels accumulate in fp32 as well, and the result is rounded once to the
    operands' dtype; only the order of the fp32 sums differs (differences of one unit in the last
    place, in ~1e-4 of the elements). What autocast keeps for the backward (activations in bf16) is
    unchanged: the mode sits below autograd and sees the forward's and the backward's products alike.
    Every other operation runs as it would without the mode."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True  # compiled code still runs under the mode: its matrix products (extern kernels) come here

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _OUT_FORMS and kwargs["out"].dtype == self.dtype:
            kwargs = dict(kwargs)
            out = kwargs.pop("out")
            return out.copy_(self.__torch_dispatch__(_OUT_FORMS[func], types, args, kwargs))
        low = func in _PRODUCTS or func in _ATTENTION
        if not low or not any(isinstance(a, torch.Tensor) and a.dtype == self.dtype for a in args):
            return func(*args, **kwargs)
        out = func(*[self._up(a) for a in args], **{k: self._up(v) for k, v in kwargs.items()})
        if func in _PRODUCTS:
            return out.to(self.dtype)
        return tuple(o.to(self.dtype) if low_dtype else o for o, low_dtype in zip(out, _ATTENTION[func]))

    def _up(self, a):
        return a.float() if isinstance(a, torch.Tensor) and a.dtype == self.dtype else a


def runs_fp32_products(device: torch.device, precision: str) -> bool:
    """Whether ``precision``'s matrix multiplies would be emulated on ``device`` (a CPU without the
    instructions for them): there loom runs them as :class:`Fp32Products`."""
    return device.type == "cpu" and precision in AUTOCAST and not _cpu_runs_natively(DTYPES[precision])


def note_cpu_precision(device: torch.device, precision: str) -> bool:
    """Say once, in the log, that ``train.precision`` bf16/fp16 runs its matrix products with fp32
    kernels on this CPU (no AVX-512 BF16/FP16 or AMX: torch's own low-precision kernels are emulated
    there); whether it was said."""
    if not runs_fp32_products(device, precision):
        return False
    log.info("train.precision=%s on a CPU without %s instructions (%s): matrix products run as fp32 kernels on "
             "%s operands, results rounded to %s (the numbers of a native kernel, far faster than torch's "
             "emulated one)", precision, precision, torch.backends.cpu.get_cpu_capability(), precision, precision)
    return True


def autocast(device: torch.device, precision: str):
    """The forward-and-backward context for ``precision``: a no-op for fp32 and fp64; for bf16/fp16
    torch's autocast, with :class:`Fp32Products` where the CPU would emulate the low-precision products."""
    if precision not in AUTOCAST:
        return contextlib.nullcontext()
    return _autocast(device, precision, runs_fp32_products(device, precision))


@contextlib.contextmanager
def _autocast(device: torch.device, precision: str, fp32_products: bool):
    with torch.autocast(device_type=device.type, dtype=DTYPES[precision]):
        with Fp32Products(DTYPES[precision]) if fp32_products else contextlib.nullcontext():
            yield


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
