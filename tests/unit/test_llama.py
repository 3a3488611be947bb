"""The Llama family (loom/models/llama): its structure, grouped-query attention and its KV cache,
its published parameter counts and cost description, and its tensor-parallel checks."""

import pytest
import torch

from loom.config import ConfigError, load_config
from loom.infer.generate import generate
from loom.models import build_model, costs, count_params, materialize, spec_of
from loom.models.common import Attention
from loom.parallel.strategy import resolve_strategies


def _llama(*overrides: str, seed: int = 0):
    cfg = load_config(None, ["model=llama-tiny", *overrides]).model
    return materialize(build_model(cfg), "cpu", seed=seed).eval()


def test_llama_has_no_biases_an_untied_head_and_rmsnorm():
    model = _llama()
    names = dict(model.named_parameters())
    assert not any(n.endswith("bias") for n in names)
    assert model.lm_head.weight is not model.tok_emb.weight
    assert isinstance(model.layers["0"].ln_1, torch.nn.RMSNorm) and isinstance(model.ln_f, torch.nn.RMSNorm)
    assert {"layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight",
            "layers.0.attn.q_proj.weight", "layers.0.attn.k_proj.weight", "layers.0.attn.out_proj.weight"} <= set(names)
    # grouped-query: 4 query heads of 16 share 2 key/value heads
    assert names["layers.0.attn.q_proj.weight"].shape == (64, 64)
    assert names["layers.0.attn.k_proj.weight"].shape == names["layers.0.attn.v_proj.weight"].shape == (32, 64)


def test_grouped_query_attention_is_multi_head_attention_with_shared_key_value_heads():
    """Query head h reads key/value head h // (n_head / n_kv_head): the same as multi-head attention
    whose key and value projections repeat each key/value head's rows for its group."""
    cfg = load_config(None, ["model=llama-tiny"]).model
    mha_cfg = load_config(None, ["model=llama-tiny", "model.n_kv_head=4"]).model
    torch.manual_seed(0)
    gqa, mha = Attention(cfg, rotary=True).double(), Attention(mha_cfg, rotary=True).double()
    hs = cfg.head_dim
    with torch.no_grad():
        for name in ("q_proj", "out_proj"):
            getattr(mha, name).weight.copy_(getattr(gqa, name).weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(cfg.kv_heads, hs, -1)  # (n_kv, hs, C)
            repeated = w.repeat_interleave(cfg.n_head // cfg.kv_heads, dim=0)  # (nh, hs, C)
            getattr(mha, name).weight.copy_(repeated.reshape(-1, w.size(-1)))
    x = torch.randn(2, 9, cfg.n_embd, dtype=torch.float64)
    torch.testing.assert_close(gqa(x, x), mha(x, x))


def test_llama_kv_cache_holds_the_key_value_heads_only_and_decodes_as_it_recomputes():
    model = _llama()
    cache = model.new_cache(batch=2, max_len=40)
    assert cache.layers[0].k.shape == (2, 2, 40, 16)  # n_kv_head = 2, not n_head = 4
    idx = torch.randint(0, 512, (2, 40))
    full = model(idx)
    pieces = [model(idx[:, :11], cache)] + [model(idx[:, t : t + 1], cache) for t in range(11, 40)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    prompt = idx[:, :5]
    a = generate(model, prompt, 25, temperature=1.0, top_k=50, seed=3, use_cache=True)
    b = generate(model, prompt, 25, temperature=1.0, top_k=50, seed=3, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("preset, published, params", [
    ("llama3-8b", 8e9, 8_030_261_248),  # Meta's released checkpoint: 8,030,261,248
    ("llama3-70b", 70e9, 70_553_706_496),
    ("llama3-405b", 405e9, 405_853_388_800),
])
def test_llama3_presets_have_the_published_parameter_counts(preset, published, params):
    cfg = load_config(None, [f"model={preset}"]).model
    n = count_params(build_model(cfg))
    assert n == params
    assert n == pytest.approx(published, rel=0.01)
    assert spec_of(cfg).published_params[preset] == published


def test_the_cost_model_counts_grouped_query_attention_and_swiglu_by_hand():
    """llama3-8b at T = 8192, counted by hand: per layer q and o d², k and v d·d/4 (8 of 32 heads),
    three SwiGLU matrices d·f; the output projection d·V; embedding lookups multiply nothing."""
    cfg = load_config(None, ["model=llama3-8b"]).model
    d, f, V, L, T = 4096, 14336, 128256, 32, 8192
    per_layer = 2 * d * d + 2 * d * (d // 4) + 3 * d * f
    c = costs(cfg)
    assert [b.matmul_params for b in c.blocks] == [per_layer] * L
    assert c.last.matmul_params == d * V and c.first.matmul_params == 0
    # PaLM: 6N + 12·L·H·Q·T (H·Q = d: the query heads' width, not the key/value heads')
    assert c.training_flops == 6 * (L * per_layer + d * V) + 12 * L * d * T
    assert c.params == L * (per_layer + 2 * d) + 2 * V * d + d


def test_tensor_parallel_must_divide_the_key_value_heads():
    cfg = load_config(None, ["model=llama-tiny"]).model  # 4 heads, 2 key/value heads
    spec = spec_of(cfg)
    resolve_strategies(build_model(cfg), spec.sharding.table, {}, tp=2, dp=1)  # whole groups per rank
    with pytest.raises(ConfigError, match=r"model.n_kv_head=2 is not divisible by parallel.tp=4 .*key/value heads"):
        resolve_strategies(build_model(cfg), spec.sharding.table, {}, tp=4, dp=1)


def test_llama_learns_a_fixed_batch():
    model = _llama().train()
    idx = torch.randint(0, 512, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_the_memory_model_counts_grouped_query_keys_and_swiglu_activations():
    """Korthikanti et al.'s 24 bytes per s·b·h that tensor parallelism splits, for GPT's block; for
    llama3-8b by hand: Q 2, K and V 0.5 each (8 of 32 heads), the output projection's input 2, and
    SwiGLU's gate, SiLU(gate), up and product of 3.5h each, 2 bytes each: 4 × 7."""
    from loom.planner.memory import split_activation_bytes
    from loom.planner.shape import model_shape

    assert split_activation_bytes(model_shape(load_config(None, ["model=gpt2-124m"]).model, 1024)) == 24
    llama = model_shape(load_config(None, ["model=llama3-8b"]).model, 8192)
    assert split_activation_bytes(llama) == 2 + 0.5 + 0.5 + 2 + 4 * 7
