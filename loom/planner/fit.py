"""Fitting ``loom calibrate``'s timings (pure functions, tested on synthetic timings): least squares in
relative terms, collectives as latency + bytes / bandwidth in the cost model's convention, Transformer
blocks as a fixed cost plus FLOPs at a rate that grows with the width."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def fit_linear(columns: Sequence[Sequence[float]], y: Sequence[float], relative: bool = True,
               nonneg: bool = True) -> list[float]:
    """Least-squares coefficients c of ``y ≈ Σ c_j · columns[j]``, weighting each point by 1/y
    (``relative``: errors count relative to the measured time, so that microsecond latencies and
    second-long transfers fit together). With ``nonneg`` a negative coefficient is dropped (set to 0)
    and the rest refitted, so a fitted latency or overhead is never below zero."""
    cols = [list(map(float, c)) for c in columns]
    ys = [float(v) for v in y]
    w = [1.0 / v if relative and v > 0 else 1.0 for v in ys]
    active = list(range(len(cols)))
    while True:
        a = torch.tensor([[cols[j][i] * w[i] for j in active] for i in range(len(ys))], dtype=torch.float64)
        b = torch.tensor([ys[i] * w[i] for i in range(len(ys))], dtype=torch.float64)
        # scale the columns so that their magnitudes (seconds vs bytes) do not upset the solver
        scale = a.abs().amax(0).clamp_min(1e-300)
        sol = torch.linalg.lstsq(a / scale, b[:, None], driver="gelsd").solution[:, 0] / scale
        coef = dict(zip(active, sol.tolist()))
        neg = [j for j in active if coef[j] < 0]
        if not (nonneg and neg) or len(active) == 1:
            return [max(0.0, coef.get(j, 0.0)) if nonneg else coef.get(j, 0.0) for j in range(len(cols))]
        active.remove(min(neg, key=lambda j: coef[j]))


def collective_factors(kind: str, n: int) -> tuple[float, float]:
    """(bytes factor, latency steps) of a collective over ``n`` ranks in the cost model's convention:
    its time is ``bytes_factor · nbytes / bandwidth + steps · latency``."""
    if kind == "send_recv":
        return 1.0, 1.0
    if kind == "all_reduce":
        return 2 * (n - 1) / n, 2 * (n - 1)
    return (n - 1) / n, n - 1


def fit_collective(kind: str, n: int, nbytes: Sequence[float], seconds: Sequence[float]) -> dict:
    """``t = a + c · nbytes`` fitted to the timings, turned into the cost model's latency (per step)
    and bus bandwidth (bytes/s) for a collective of ``kind`` over ``n`` ranks. When the time does not
    grow with the size at the sizes measured (all latency, or noise), the bandwidth is the lower bound
    that the largest transfer shows (as if all its time were transfer), never an infinite one."""
    a, c = fit_linear([[1.0] * len(nbytes), nbytes], seconds)
    factor, steps = collective_factors(kind, n)
    largest = max(range(len(nbytes)), key=lambda i: nbytes[i])
    bandwidth = factor / c if c > 0 else factor * nbytes[largest] / max(seconds[largest], 1e-12)
    return {"latency_s": a / steps, "bandwidth": bandwidth, "intercept_s": a, "s_per_byte": c}


def block_regressors(flops: float, width: float) -> tuple[float, float, float]:
    """Columns of the block-time fit ``t = t₀ + flops/R + flops · (n₀/R) / h``."""
    return 1.0, flops, flops / width


def fit_block(points: Sequence[tuple[float, float, float]]) -> dict:
    """(FLOPs, width h, seconds) triples -> ``{"overhead_s": t₀, "rate": R, "half_width": n₀}`` of
    ``t = t₀ + FLOPs / (R · h / (h + n₀))``."""
    cols = list(zip(*(block_regressors(f, h) for f, h, _ in points)))
    t0, inv_r, n0_over_r = fit_linear(cols, [t for _, _, t in points])
    if inv_r <= 0:  # all points at one width: no separate n₀
        inv_r, n0_over_r = fit_linear([cols[1]], [t - t0 for _, _, t in points])[0], 0.0
    return {"overhead_s": t0, "rate": 1.0 / inv_r if inv_r > 0 else math.inf,
            "half_width": n0_over_r / inv_r if inv_r > 0 else 0.0}
