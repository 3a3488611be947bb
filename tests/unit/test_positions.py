"""Position encodings (loom/models/common/positions.py): each as its definition says, and each
usable in GPT with KV-cached decoding equal to recomputation."""

import math

import pytest
import torch

from loom.config import ConfigError, load_config
from loom.models import build_model, materialize
from loom.models.common.positions import apply_rotary, relative_bias_inputs, relative_buckets, rotary_angles, sinusoidal


def test_sinusoidal_matches_the_formula_of_vaswani_et_al():
    d = 10
    got = sinusoidal(torch.arange(50), d)
    for p in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = p / 10000 ** (2 * i / d)
            assert got[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-12)
            assert got[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-12)


def _rotary_score(q: torch.Tensor, k: torch.Tensor, m: int, n: int, theta: float = 10000.0) -> float:
    """Score of query vector ``q`` at position m and key vector ``k`` at position n, both (hs,)."""
    cos, sin = rotary_angles(torch.tensor([m, n]), q.numel(), theta, torch.float64)
    qm = apply_rotary(q.view(1, 1, 1, -1), cos[:1], sin[:1])
    kn = apply_rotary(k.view(1, 1, 1, -1), cos[1:], sin[1:])
    return (qm * kn).sum().item()


def test_rotary_scores_depend_only_on_the_offset():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    for m, n in ((3, 0), (10, 4), (7, 7), (0, 5)):
        base = _rotary_score(q, k, m, n)
        for shift in (1, 13, 500):
            assert _rotary_score(q, k, m + shift, n + shift) == pytest.approx(base, rel=1e-10, abs=1e-12)
    # ... and they do depend on the offset (the encoding is not the identity)
    scores = {round(_rotary_score(q, k, m, 0), 6) for m in range(6)}
    assert len(scores) == 6


def test_rotary_is_a_rotation_and_the_identity_at_position_zero():
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    cos, sin = rotary_angles(torch.arange(5), 8, 10000.0, torch.float64)
    y = apply_rotary(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])


def test_relative_buckets_follow_t5():
    """T5's buckets (32, max distance 128), by hand: offsets under half the (per-direction) buckets
    exactly, then logarithmic, the farthest all in the last; a decoder's future keys in bucket 0."""
    def expected(offset: int, bidirectional: bool) -> int:
        n, base = (16, 16 * (offset > 0)) if bidirectional else (32, 0)
        d = abs(offset) if bidirectional else max(-offset, 0)
        exact = n // 2
        return base + (d if d < exact else min(n - 1, exact + int(math.log(d / exact) / math.log(128 / exact)
                                                                   * (n - exact))))
    offsets = torch.arange(-300, 301)
    for bidirectional in (True, False):
        got = relative_buckets(offsets, bidirectional).tolist()
        assert got == [expected(o, bidirectional) for o in offsets.tolist()]
    assert relative_buckets(torch.tensor([-10, 10, -200]), True).tolist() == [8, 24, 15]


def test_relative_bias_depends_only_on_the_offset():
    q, k = torch.arange(5, 12), torch.arange(0, 12)
    base = relative_bias_inputs(q, k, bidirectional=False, dtype=torch.float64)
    for shift in (1, 40, 1000):
        assert torch.equal(relative_bias_inputs(q + shift, k + shift, bidirectional=False, dtype=torch.float64), base)
    assert not torch.equal(base[0], base[1])


def _gpt(*overrides: str):
    cfg = load_config(None, ["model=gpt-tiny", *overrides]).model
    return materialize(build_model(cfg), "cpu", seed=0).eval()


@pytest.mark.parametrize("positions", ["sinusoidal", "rotary", "relative"])
def test_gpt_with_other_positions_decodes_from_the_cache_as_it_recomputes(positions):
    model = _gpt(f"model.positions={positions}", "model.n_kv_head=2")
    idx = torch.randint(0, model.cfg.vocab_size, (2, 30))
    full = model(idx)
    cache = model.new_cache(batch=2)
    pieces = [model(idx[:, :7], cache), model(idx[:, 7:12], cache)]
    pieces += [model(idx[:, t : t + 1], cache) for t in range(12, 30)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_gpt_positions_choose_the_position_weights():
    names = {p: {n for n, _ in _gpt(f"model.positions={p}").named_parameters()}
             for p in ("learned", "sinusoidal", "rotary", "relative")}
    assert "pos_emb.weight" in names["learned"]
    assert names["sinusoidal"] == names["rotary"] == names["learned"] - {"pos_emb.weight"}
    assert names["relative"] == names["rotary"] | {f"layers.{i}.attn.rel_bias.weight" for i in range(2)}
    # and they change what the model computes
    idx = torch.randint(0, 512, (1, 12))
    outs = [_gpt(f"model.positions={p}")(idx) for p in ("learned", "sinusoidal", "rotary")]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


@pytest.mark.parametrize("overrides, fragment", [
    (["model.positions=alibi"], "model.positions='alibi' is not valid; choose one of: auto, learned, sinusoidal"),
    (["model=pangu-tiny", "model.positions=relative"], "model.positions=relative is not supported by model.arch=pangu"),
    (["model=pangu-tiny", "model.positions=rotary"],
     "model.positions=rotary is not supported by model.arch=pangu; valid for it: auto (learned), learned, sinusoidal"),
    (["model=llama-tiny", "model.positions=learned"], "not supported by model.arch=llama; valid for it: auto (rotary)"),
    (["model.n_kv_head=3"], "model.n_kv_head=3 does not divide model.n_head=4"),
    (["model.n_kv_head=8"], "model.n_kv_head=8 must be a finite number in [1, 4]"),
    (["model.positions=rotary", "model.n_head=64"], "head width model.n_embd / model.n_head = 3 is odd"),
    (["model=llama-tiny", "model.n_embd=60", "model.n_head=4"], "head width model.n_embd / model.n_head = 15 is odd"),
    (["model.rope_theta=0"], "model.rope_theta=0.0 must be a finite number in (0, inf)"),
    (["model=llama-tiny", "model.moe.experts=4"], "the Llama family is dense"),
])
def test_bad_position_or_head_settings_are_one_clear_line(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert fragment in str(e.value) and "\n" not in str(e.value)
