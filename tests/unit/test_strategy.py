"""Shard strategies: our names and MindSpore's notation, resolved onto meta-device models."""

from __future__ import annotations

import pytest

from loom.config import ConfigError, load_config
from loom.models import build_model, spec_of
from loom.parallel.strategy import parse_strategy, resolve_strategies


def meta(preset: str, *overrides: str):
    return build_model(load_config(None, [f"model={preset}", *overrides]).model)


@pytest.mark.parametrize("text, tp, dp, expected", [
    ("((dp,1),(mp,1))", 2, 1, "colwise"),  # PanGu-α's QKV and FFN mapping: weight (N,K), N split
    ("((dp,mp),(mp,1))", 2, 1, "rowwise"),  # PanGu-α's FFN projection: weight (K,N), K split
    ("((dp,mp),(1,mp))", 2, 1, "rowwise"),  # weight (N,K), K split
    ("((dp,1),(1,mp))", 2, 1, "colwise"),  # weight (K,N), N split
    ("((dp,1),(1,1))", 2, 1, "replicate"),
    ("((dp,1),(tp,1))", 2, 1, "colwise"),  # tp and mp are the same axis
    ("((dp,tp),(tp,1))", 2, 1, "rowwise"),
    (" ( ( dp , 1 ) ,\t( mp , 1 ) ) ", 2, 1, "colwise"),
    ("((2,1),(4,1))", 4, 2, "colwise"),  # integers: 4 = tp, 2 = dp on the rows
    ("((1,4),(4,1))", 4, 2, "rowwise"),
    ("((1,1),(1,1))", 4, 2, "replicate"),
    ("((2,2),(2,1))", 2, 2, "rowwise"),  # tp == dp: rows read as dp, the rest as tp
    ("[[dp,1],[mp,1]]", 2, 1, "colwise"),
    ("colwise", 2, 1, "colwise"),
    ("Vocab", 2, 1, "vocab"),
    ("replicate", 2, 1, "replicate"),
])
def test_parse_names_and_mindspore_notation(text, tp, dp, expected):
    assert parse_strategy(text, tp=tp, dp=dp) == expected


@pytest.mark.parametrize("text, match", [
    ("((dp,mp),(mp,mp))", "both dimensions"),
    ("((dp,mp),(1,1))", "K splits must agree"),
    ("((mp,1),(mp,1))", "rows split only over data parallelism"),
    ("((dp,1),(3,1))", "axis '3'"),
    ("((dp,1),(dp,1))", "only over mp/tp"),
    ("((dp,1),(xp,1))", "axis 'xp'"),
    ("colwize", "neither a strategy name"),
    ("((dp,1))", "neither a strategy name"),
])
def test_bad_strategies_say_what_is_wrong_and_what_is_valid(text, match):
    with pytest.raises(ConfigError, match=match) as e:
        parse_strategy(text, tp=2, dp=1)
    msg = str(e.value)
    assert repr(text) in msg and "valid: colwise, rowwise, vocab, replicate" in msg and "\n" not in msg


def strategy_table(arch: str) -> dict[str, str]:
    return dict(spec_of(arch).sharding.table)


def test_builtin_tables():
    gpt, pangu = strategy_table("gpt"), strategy_table("pangu")
    assert gpt["layers.*.attn.q_proj"] == "colwise" and gpt["layers.*.mlp.proj"] == "rowwise"
    assert gpt["tok_emb"] == gpt["lm_head"] == "vocab"
    assert {k: v for k, v in pangu.items() if k in gpt} == gpt
    assert pangu["top_query_emb"] == "replicate" and pangu["top_query_layer.attn.out_proj"] == "rowwise"
    with pytest.raises(ConfigError, match="model.arch='t5'"):
        spec_of("t5")


def test_resolution_covers_every_weight_and_overrides_win():
    model = meta("gpt-tiny")
    got = resolve_strategies(model, strategy_table("gpt"), {"layers.1.mlp.*": "replicate"}, tp=2, dp=1)
    assert got["layers.0.attn.k_proj"] == "colwise" and got["layers.0.mlp.fc"] == "colwise"
    assert got["layers.1.mlp.fc"] == got["layers.1.mlp.proj"] == "replicate"  # later pattern wins; drop skipped
    assert got["lm_head"] == got["tok_emb"] == "vocab" and got["pos_emb"] == "replicate"
    assert "layers.0.ln_1" not in got  # not named: replicated (or sequence-parallel) by default
    assert list(got) == [n for n, _ in model.named_modules() if n in got]  # in model order


def test_pangu_builtin_equals_its_mindspore_strategies():
    model = meta("pangu-tiny")
    builtin = resolve_strategies(model, strategy_table("pangu"), {}, tp=2, dp=1)
    mindspore = {
        "layers.*.attn.q_proj": "((dp,1),(mp,1))", "layers.*.attn.k_proj": "((dp,1),(mp,1))",
        "layers.*.attn.v_proj": "((dp,1),(mp,1))", "layers.*.attn.out_proj": "((dp,mp),(mp,1))",
        "layers.*.mlp.fc": "((dp,1),(mp,1))", "layers.*.mlp.proj": "((dp,mp),(mp,1))",
    }
    assert resolve_strategies(model, strategy_table("pangu"), mindspore, tp=2, dp=1) == builtin
    assert builtin["top_query_layer.attn.q_proj"] == "colwise" and builtin["top_query_emb"] == "replicate"


@pytest.mark.parametrize("overrides, match", [
    ({"layers.*.mlp.fcx": "colwise"}, r"'layers.\*.mlp.fcx' names no module of this model \(did you mean "
                                      r"'layers.\*.mlp.fc'\?\); modules look like: tok_emb, pos_emb, layers.\*.ln_1"),
    ({"layers.*.attn": "colwise"}, "names Attention modules, which own no weights"),
    ({"tok_emb": "colwise"}, r"'colwise' cannot apply to 'tok_emb' \(Embedding\); valid for it: vocab, replicate"),
    ({"layers.0.ln_1": "vocab"}, r"'vocab' cannot apply to 'layers.0.ln_1' \(LayerNorm\); valid for it: replicate"),
    ({"lm_head": "colwise"}, r"cannot apply to 'lm_head' \(Linear\); valid for it: vocab, replicate"),
    ({"layers.0.mlp.proj": "replicate"}, "layers.0.mlp.fc=colwise, layers.0.mlp.proj=replicate do not pair up"),
    ({"layers.0.attn.k_proj": "rowwise"}, "q_proj/k_proj/v_proj colwise must feed out_proj rowwise"),
    ({"tok_emb": "replicate"}, "'tok_emb' and 'lm_head' share one tied weight but are given replicate and vocab"),
    ({"lm_head": "((dp,mp),(mp,mp))"}, r"parallel.strategies\['lm_head'\]: strategy '\(\(dp,mp\),\(mp,mp\)\)'"),
])
def test_resolution_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        resolve_strategies(meta("gpt-tiny"), strategy_table("gpt"), overrides, tp=2, dp=1)


def test_indivisible_splits_name_the_config_keys():
    heads = r"model.n_head=4 is not divisible by parallel.tp=8 .*heads.*\(e.g. 1, 2, 4\).*'layers.\*.attn.\*' to repl"
    with pytest.raises(ConfigError, match=heads):
        resolve_strategies(meta("gpt-tiny"), strategy_table("gpt"), {}, tp=8, dp=1)
    odd = meta("gpt-tiny", "model.n_head=6", "model.n_embd=96", "model.ffn_hidden=100", "model.vocab_size=513")
    with pytest.raises(ConfigError, match="model.ffn_hidden=100 is not divisible by parallel.tp=3"):
        resolve_strategies(odd, strategy_table("gpt"), {}, tp=3, dp=1)
    with pytest.raises(ConfigError, match="model.vocab_size=513 is not divisible by parallel.tp=2"):
        resolve_strategies(odd, strategy_table("gpt"), {}, tp=2, dp=1)
    # replicating what does not divide is a way out
    resolve_strategies(odd, strategy_table("gpt"), {"tok_emb": "replicate", "lm_head": "replicate"}, tp=2, dp=1)


