import math

import pytest
import torch
from torch import nn

from loom.config import load_config
from loom.train.optim import Lamb, build_optimizer, lr_at, param_groups


def small_problem(seed=0):
    """A two-layer regression: matrices and biases, so decay groups and per-layer trust ratios matter."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)
    return model, x, y


def grads_of(model, x, y):
    model.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def reference_lamb(params, grads_fn, steps, lr, b1, b2, eps, wd):
    """LAMB, You et al. 2020 Algorithm 2, written from the paper with plain tensors."""
    w = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in w]
    v = [torch.zeros_like(p) for p in w]
    for t in range(1, steps + 1):
        for i, g in enumerate(grads_fn(w)):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            r = m_hat / (v_hat.sqrt() + eps) + wd[i] * w[i]
            wn, rn = w[i].norm(), r.norm()
            trust = (wn / rn) if (wn > 0 and rn > 0) else 1.0
            w[i] = w[i] - lr * trust * r
    return w


def reference_adamw(params, grads_fn, steps, lr, b1, b2, eps, wd):
    """AdamW, Loshchilov & Hutter 2019 Algorithm 2 (decoupled decay applied as lr * wd * w)."""
    w = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in w]
    v = [torch.zeros_like(p) for p in w]
    for t in range(1, steps + 1):
        for i, g in enumerate(grads_fn(w)):
            w[i] = w[i] * (1 - lr * wd[i])
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            w[i] = w[i] - lr * (m[i] / (1 - b1**t)) / ((v[i] / (1 - b2**t)).sqrt() + eps)
    return w


def run_and_compare(optimizer_name, reference):
    model, x, y = small_problem()
    probe, _, _ = small_problem()

    def grads_fn(weights):
        with torch.no_grad():
            for p, w in zip(probe.parameters(), weights):
                p.copy_(w)
        return grads_of(probe, x, y)

    cfg = load_config(None, [f"train.optimizer={optimizer_name}", "train.lr=0.01", "train.weight_decay=0.1",
                             "train.beta1=0.9", "train.beta2=0.99", "train.eps=1e-6"]).train
    wd = [0.1 if p.dim() >= 2 else 0.0 for p in model.parameters()]
    expected = reference(list(model.parameters()), grads_fn, 10, 0.01, 0.9, 0.99, 1e-6, wd)
    opt = build_optimizer(model, cfg)
    for _ in range(10):
        grads_of(model, x, y)
        opt.step()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)


def test_lamb_matches_reference_implementation():
    run_and_compare("lamb", reference_lamb)


def test_adamw_matches_reference_implementation():
    run_and_compare("adamw", reference_adamw)


def test_lamb_trust_ratio_scales_each_layer_by_its_norm():
    """With one step from zero moments, |update| per element is ~1, so the step of each layer has
    norm lr * ||w||: layers of different scale move by the same relative amount."""
    big, small = nn.Parameter(torch.full((4, 4), 10.0)), nn.Parameter(torch.full((4, 4), 0.1))
    opt = Lamb([big, small], lr=0.01, betas=(0.9, 0.999), eps=1e-12)
    big.grad, small.grad = torch.randn(4, 4), torch.randn(4, 4)
    before = [big.detach().clone(), small.detach().clone()]
    opt.step()
    for p, b in zip((big, small), before):
        assert (p.detach() - b).norm() / b.norm() == pytest.approx(0.01, rel=1e-4)


def test_weight_decay_only_on_matrices():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert {p.dim() for p in decay["params"]} == {2} and len(decay["params"]) == 2
    assert {p.dim() for p in no_decay["params"]} == {1} and no_decay["weight_decay"] == 0.0


def test_schedule_warms_up_then_follows_cosine_to_min_lr():
    cfg = load_config(None, ["train.steps=111", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr=0.1"]).train
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg) == pytest.approx(0.1)  # the last step run (steps - 1) ends at min_lr
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 110))
