"""Numerical helpers shared by models and tasks."""

from __future__ import annotations

import torch


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if it is in a narrower float dtype (bf16, fp16); float32 and float64 as they
    are. Softmaxes, routers and losses use it: they need fp32's range under autocast, and a float64
    run (``train.precision=fp64``) must never be rounded down to float32."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
