"""The Mixture-of-Experts layer on one device: routing, capacity, dispatch, auxiliary losses."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from loom.config import ConfigError, load_config
from loom.models import build_model, count_params, materialize, matmul_params, n_moe_layers
from loom.models.common import STAT_FIELDS, MoE, moe_layers, no_stats
from loom.parallel.plan import check_plan, plan_from_config


def _cfg(*overrides: str):
    return load_config(None, ["model=switch-tiny", *overrides]).model


def _layer(*overrides: str, seed: int = 0) -> MoE:
    model = materialize(build_model(_cfg(*overrides)), "cpu", seed)
    return model.layers["0"].mlp if isinstance(model.layers["0"].mlp, MoE) else model.layers["1"].mlp


def _expert(layer: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    w = layer.experts
    return F.gelu(x @ w.w1[e] + w.b1[e], approximate="tanh") @ w.w2[e] + w.b2[e]


def _naive(layer: MoE, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Token by token: each sequence fills each expert's capacity with first choices in position
    order, then second choices; the output is the gate-weighted sum of the kept experts."""
    route = layer.router(x.reshape(-1, x.size(-1)), group_size=x.size(1))
    b, t, _ = x.shape
    cap = layer.capacity(t)
    out, dropped = torch.zeros_like(x), 0
    for s in range(b):
        used = [0] * layer.n_experts
        for j in range(layer.k):
            for pos in range(t):
                n = s * t + pos
                if not route.active[n, j]:
                    continue
                e = int(route.experts[n, j])
                if used[e] < cap:
                    used[e] += 1
                    out[s, pos] += route.gates[n, j] * _expert(layer, e, x[s, pos])
                else:
                    dropped += 1
    return out, dropped


@pytest.mark.parametrize("overrides", [
    [],  # switch, top-1, capacity 1.25
    ["model.moe.capacity_factor=0.5"],  # many drops
    ["model.moe.capacity_factor=0"],  # no capacity limit
    ["model.moe.router=top2", "model.moe.top_k=2", "model.moe.random_routing=false"],
    ["model.moe.router=noisy-topk", "model.moe.top_k=3", "model.moe.capacity_factor=1.0"],
])
@torch.no_grad()
def test_sorted_dispatch_equals_token_by_token_routing(overrides):
    layer = _layer(*overrides).eval()
    x = torch.randn(3, 16, 64)
    want, dropped = _naive(layer, x)
    got = layer(x)  # in eval: no router noise, no random routing
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    route = layer.router(x.reshape(-1, 64), group_size=16)
    d = layer._dispatch(route, 3, 16)
    counts, n_dropped = d.counts, d.dropped
    assert int(n_dropped) == dropped
    assert int(counts.sum()) == int(route.active.sum()) - dropped
    assert torch.equal(counts, torch.bincount(d.expert, minlength=layer.n_experts))
    assert bool((d.expert[1:] >= d.expert[:-1]).all())  # sorted by expert, as the grouped GEMM reads them
    assert torch.equal(d.load, torch.bincount(route.experts[route.active], minlength=layer.n_experts))
    if "model.moe.capacity_factor=0.5" in overrides:
        assert dropped > 0


def test_capacity_follows_the_switch_formula():
    layer = _layer()  # 8 experts, top-1, factor 1.25
    assert layer.capacity(64) == math.ceil(64 * 1.25 / 8) == 10
    assert _layer("model.moe.router=top2", "model.moe.top_k=2").capacity(64) == math.ceil(2 * 64 * 1.25 / 8)
    assert _layer("model.moe.capacity_factor=0").capacity(64) == 64


@torch.no_grad()
def test_sequences_are_routed_independently_of_their_batch():
    """Capacity and losses are per sequence: a batch split anywhere routes each sequence the same."""
    layer = _layer("model.moe.capacity_factor=0.75").eval()
    x = torch.randn(4, 16, 64)
    whole = layer(x)
    parts = torch.cat([layer(x[:1]), layer(x[1:3]), layer(x[3:])])
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)


def test_switch_balance_loss_is_alpha_at_uniform_routing_and_grows_with_skew():
    layer = _layer()
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        layer.router.gate.weight.zero_()  # every probability 1/E; top-1 ties go to expert 0
    route = layer.router(x.reshape(-1, 64), group_size=16)
    # f = (1, 0, ..., 0), P = 1/E everywhere: α·E·Σ f_i P_i = α
    assert route.aux_loss.item() == pytest.approx(0.01, rel=1e-6)
    with torch.no_grad():
        layer.router.gate.weight.normal_(0, 0.02)
    balanced = layer.router(x.reshape(-1, 64), group_size=16).aux_loss.item()
    assert 0.01 * 0.9 < balanced < 0.01 * 1.5  # near α when tokens spread
    # z-loss: β·mean(logsumexp(logits)²)
    logits = x.reshape(-1, 64) @ layer.router.gate.weight.T
    assert layer.router(x.reshape(-1, 64), 16).z_loss.item() == pytest.approx(
        1e-3 * torch.logsumexp(logits, -1).pow(2).mean().item(), rel=1e-5)


def test_auxiliary_losses_reach_the_router_through_backward_with_the_loss_scale():
    layer = _layer().train()
    x = torch.randn(2, 16, 64)
    layer.aux_grad_scale = 0.25
    layer(x).sum().mul(0).backward()  # nothing from the output: only the attached auxiliary losses
    got = layer.router.gate.weight.grad.clone()
    layer.zero_grad()
    route = layer.router(x.reshape(-1, 64), group_size=16)
    (0.25 * (route.aux_loss + route.z_loss)).backward()
    torch.testing.assert_close(got, layer.router.gate.weight.grad)
    assert got.abs().sum() > 0


def test_top2_random_routing_drops_second_choices_in_training_only():
    layer = _layer("model.moe.router=top2", "model.moe.top_k=2")
    x = torch.randn(4, 32, 64)
    train_route = layer.train().router(x.reshape(-1, 64), 32)
    eval_route = layer.eval().router(x.reshape(-1, 64), 32)
    assert train_route.active[:, 0].all() and not train_route.active[:, 1].all()
    assert eval_route.active.all()
    torch.testing.assert_close(eval_route.gates.sum(-1), torch.ones(128))  # renormalized over the pair


def test_noisy_topk_noise_in_training_and_its_losses_train_the_noise_weights():
    layer = _layer("model.moe.router=noisy-topk", "model.moe.top_k=2")
    x = torch.randn(4, 32, 64)
    a, b = layer.eval().router(x.reshape(-1, 64), 32), layer.eval().router(x.reshape(-1, 64), 32)
    assert torch.equal(a.experts, b.experts)
    torch.manual_seed(0)
    noisy = layer.train().router(x.reshape(-1, 64), 32)
    assert not torch.equal(noisy.experts, a.experts)
    noisy.aux_loss.backward()
    assert noisy.aux_loss.item() > 0 and layer.router.noise.weight.grad.abs().sum() > 0


def test_statistics_count_training_forwards_but_not_recomputation():
    layer = _layer().train()
    x = torch.randn(2, 16, 64)
    layer(x)
    with no_stats():
        layer(x)
    layer.eval()(x)
    assert len(layer.stats) == 1
    row = layer.stats[0]
    assert row.numel() == 8 + len(STAT_FIELDS)
    assert row[:8].sum().item() == row[8].item() == 32  # every token routed once (top-1)
    assert row[-1].item() == 2  # two sequences


def test_presets_and_parameter_counts():
    sb = load_config(None, ["model=switch-base"]).model
    assert n_moe_layers(sb) == 12
    assert count_params(build_model(sb)) == pytest.approx(7.4e9, rel=0.005)  # Switch-Base, 128 experts
    glam = load_config(None, ["model=glam-1.2t"]).model
    # GLaM 64B/64E as published: 64 layers, d=8192, ffn 32768, 64 experts every other layer, vocab 256k.
    # Its FFNs are gated and it has relative position biases; these plain ones give 1.136T (published
    # 1.2T) and 70.8B active weights per token (published 96.6B)
    assert count_params(build_model(glam)) == pytest.approx(1.136083e12, rel=1e-5)
    assert matmul_params(glam) == pytest.approx(70.83e9, rel=1e-3)
    model = build_model(load_config(None, ["model=glam-tiny"]).model)
    assert [name for name, _ in moe_layers(model)] == ["layers.1.mlp", "layers.3.mlp"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.moe.top_k=2"], "router=switch routes each token to 1"),
    (["model.moe.router=top2"], "set model.moe.top_k=2"),
    (["model.moe.top_k=9"], "model.moe.top_k=9"),
    (["model.moe.every=3"], "leaves no MoE layer"),
    (["model.moe.router=top3"], "choose one of: switch, top2, noisy-topk"),
    (["model.moe.capacity_factor=-1"], "model.moe.capacity_factor"),
    (["model.moe.experts=-2"], "model.moe.experts"),
])
def test_bad_moe_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, ["model=switch-tiny", *overrides])


@pytest.mark.parametrize(("overrides", "world", "message"), [
    (["model=gpt-tiny", "parallel.ep=2"], 2, "is dense"),
    (["parallel.ep=3"], 3, "must divide model.moe.experts=8"),
    (["parallel.ep=2", "parallel.dp=2", "train.batch_size=6"], 4, "parallel.dp × parallel.ep = 4"),
    (["parallel.ep=2"], 4, "parallel.dp × parallel.ep × parallel.tp × parallel.pp = 1 × 2 × 1 × 1 = 2"),
    (["parallel.ep=2", "parallel.dp=2", "parallel.zero=2", "parallel.offload=optimizer"], 4, "not supported"),
])
def test_bad_expert_parallel_layouts_are_one_line_errors(overrides, world, message):
    cfg = load_config(None, ["model=switch-tiny", *overrides])
    with pytest.raises(ConfigError, match=message):
        check_plan(plan_from_config(cfg), cfg, world)


def test_an_old_mesh_order_without_ep_places_it_inside_dp():
    cfg = load_config(None, ["model=switch-tiny", "parallel.mesh_order=[tp,dp,pp]"])
    assert plan_from_config(cfg).mesh_order == ("tp", "dp", "ep", "pp")


def test_generation_with_a_kv_cache_runs_moe_models():
    """Without a capacity limit a token's routing depends on nothing but itself, so decoding with a
    KV cache gives exactly what recomputing the whole sequence gives."""
    from loom.infer.generate import generate

    model = materialize(build_model(_cfg("model.moe.capacity_factor=0")), "cpu", 3).eval()
    prompt = torch.randint(0, 512, (2, 5))
    a = generate(model, prompt, 20, temperature=1.0, top_k=20, seed=7, use_cache=True)
    b = generate(model, prompt, 20, temperature=1.0, top_k=20, seed=7, use_cache=False)
    assert torch.equal(a, b) and a.shape == (2, 25)


def test_pangu_alpha_takes_moe_blocks_and_keeps_its_top_query_layer_dense():
    cfg = load_config(None, ["model=pangu-tiny", "model.moe.experts=4", "model.moe.router=top2",
                             "model.moe.top_k=2"]).model
    model = materialize(build_model(cfg), "cpu", 0).train()
    assert [n for n, _ in moe_layers(model)] == ["layers.0.mlp", "layers.1.mlp"] and n_moe_layers(cfg) == 2
    assert not isinstance(model.top_query_layer.mlp, MoE)
    model(torch.randint(0, 512, (2, 16))).float().logsumexp(-1).mean().backward()
    assert model.layers["1"].mlp.experts.w1.grad.abs().sum() > 0
    assert model.layers["1"].mlp.router.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("counts", [[3, 0, 9, 4], [0, 0, 0, 0]])
def test_grouped_experts_equal_the_loop_over_experts(counts):
    """The grouped-GEMM path of expert_ffn (fp32 on a CPU) gives the per-expert loop's outputs and
    gradients, with empty experts and with no token at all (still in the graph)."""
    from loom.models.common import moe

    torch.manual_seed(0)
    e, c, h = 4, 8, 16
    ws = [torch.randn(e, c, h), torch.randn(e, h), torch.randn(e, h, c), torch.randn(e, c)]
    x = torch.randn(sum(counts), c)
    results = []
    for grouped in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, *ws)]
        with mock.patch.object(moe, "_grouped_mm_runs", lambda *a, g=grouped: g):
            y = moe.expert_ffn(leaves[0], torch.tensor(counts), *leaves[1:])
        y.backward(torch.ones_like(y))
        results.append([y.detach(), *(t.grad for t in leaves)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
