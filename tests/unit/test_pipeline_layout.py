"""Pipeline layout: the balanced split of the blocks into stages, which stages each rank holds, the
checks made before any process starts, and the stage copies (run here in one process)."""

from __future__ import annotations

import itertools

import pytest
import torch

from loom.config import ConfigError, load_config
from loom.models import build_model, costs, materialize, n_blocks, spec_of
from loom.parallel.pipeline import check_pipeline, stage_ids, stage_layout, stage_module


def block_flops(cfg) -> float:
    """Forward FLOPs per token of a dense block: 2 per weight (4C² attention, 2·C·ffn MLP) plus the
    attention scores and weighted sum over T positions (4·C·T)."""
    c = cfg.n_embd
    return 8.0 * c * c + 4.0 * c * cfg.ffn + 4.0 * c * cfg.block_size


def _cfg(preset: str, **overrides):
    return load_config(None, [f"model={preset}", *(f"model.{k}={v}" for k, v in overrides.items())]).model


def _costs(cfg, sizes: tuple[int, ...]) -> list[float]:
    """Stage costs of a split into ``sizes`` blocks each, as stage_layout counts them."""
    blk, head = block_flops(cfg), 2.0 * cfg.n_embd * cfg.vocab_size + (block_flops(cfg) if cfg.arch == "pangu" else 0)
    costs = [k * blk for k in sizes]
    costs[0] += cfg.n_embd
    costs[-1] += head
    return costs


def _compositions(n: int, k: int):
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        yield tuple(b - a for a, b in zip(bounds, bounds[1:]))


@pytest.mark.parametrize("preset,overrides,n_stages", [
    ("gpt-tiny", dict(n_layer=8), 4),
    ("gpt2-124m", {}, 4),
    ("gpt2-124m", {}, 3),
    ("pangu-mini", dict(n_layer=10), 3),
    ("pangu-2.6b", dict(n_layer=12), 4),
    ("gpt-mini", dict(n_layer=9, ffn_hidden=100), 2),
])
def test_layout_is_contiguous_complete_and_optimal(preset, overrides, n_stages):
    cfg = _cfg(preset, **overrides)
    specs = stage_layout(cfg, n_stages)
    assert [s.index for s in specs] == list(range(n_stages))
    assert [b for s in specs for b in s.blocks] == list(range(n_blocks(cfg)))  # each block once, in order
    assert all(len(s.blocks) >= 1 for s in specs)
    assert [s.embed for s in specs] == [True] + [False] * (n_stages - 1)
    assert [s.head for s in specs] == [False] * (n_stages - 1) + [True]
    sizes = tuple(len(s.blocks) for s in specs)
    assert [s.flops for s in specs] == pytest.approx(_costs(cfg, sizes))
    best = min(max(_costs(cfg, c)) for c in _compositions(n_blocks(cfg), n_stages))  # brute force
    assert max(s.flops for s in specs) == pytest.approx(best)


def test_layout_balances_flops_not_blocks():
    # GPT-2's output projection (2·768·50257 FLOPs per token) costs about 4.5 blocks: the last stage
    # gets the fewest blocks.
    sizes = [len(s.blocks) for s in stage_layout(_cfg("gpt2-124m"), 4)]
    assert sizes[-1] == min(sizes) < max(sizes) and sum(sizes) == 12
    # Blocks much dearer than the head split evenly.
    assert [len(s.blocks) for s in stage_layout(_cfg("gpt-tiny", n_layer=8), 4)] == [2, 2, 2, 2]
    # The ffn width counts: PanGu-2.6b's blocks are n_layer - 1, the top query layer sits in the head.
    cfg = _cfg("pangu-2.6b")
    assert n_blocks(cfg) == 31 and block_flops(cfg) == 8 * 2560**2 + 4 * 2560 * 10240 + 4 * 2560 * 1024
    # the family's cost description says the same, block by block, and the top query layer costs one more
    c = costs(cfg)
    assert [b.flops for b in c.blocks] == [block_flops(cfg)] * 31
    assert c.last.flops == 2.0 * 2560 * 40000 + block_flops(cfg)
    assert stage_layout(cfg, 1)[0].blocks == range(31)


def test_too_few_blocks_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model.n_layer=3 gives 2 blocks, which cannot fill parallel.pp × "
                                          r"parallel.virtual_stages = 4 stages"):
        stage_layout(_cfg("pangu-tiny"), 4)
    assert len(stage_layout(_cfg("gpt-tiny", n_layer=4), 4)) == 4


def test_stage_ids():
    assert [stage_ids(r, 4, 1, "1f1b") for r in range(4)] == [[0], [1], [2], [3]]
    assert [stage_ids(r, 2, 3, "interleaved") for r in range(2)] == [[0, 2, 4], [1, 3, 5]]
    assert [stage_ids(r, 4, 2, "zero-bubble") for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]


@pytest.mark.parametrize("pp,v,schedule,mb,batch,message", [
    (2, 1, "interleaved", 4, 8, r"parallel.schedule=interleaved needs parallel.virtual_stages>=2.*1f1b"),
    (2, 2, "1f1b", 4, 8, r"parallel.schedule=1f1b runs one stage per rank"),
    (2, 2, "gpipe", 4, 8, r"parallel.schedule=gpipe runs one stage per rank"),
    (2, 1, "zero-bubble", 4, 8, r"zero-bubble \(ZB-V\) holds exactly 2 stages per rank"),
    (2, 3, "zero-bubble", 4, 8, r"zero-bubble \(ZB-V\) holds exactly 2 stages per rank"),
    (4, 1, "1f1b", 2, 8, r"parallel.microbatches=2 is fewer than parallel.pp=4"),
    (4, 2, "interleaved", 9, 9, r"parallel.microbatches=9 is not a whole number of rounds"),
    (2, 1, "gpipe", 3, 8, r"batch of 8 sequences per data-parallel replica is not divisible by .*microbatches=3"),
    (8, 2, "interleaved", 8, 8, r"gives 12 blocks, which cannot fill .* = 16 stages"),
])
def test_check_pipeline_errors(pp, v, schedule, mb, batch, message):
    with pytest.raises(ConfigError, match=message):
        check_pipeline(_cfg("gpt2-124m"), pp, v, schedule, mb, batch)


@pytest.mark.parametrize("pp,v,schedule,mb", [
    (2, 1, "gpipe", 1), (4, 1, "1f1b", 4), (2, 2, "interleaved", 3), (4, 2, "interleaved", 6),
    (4, 3, "interleaved", 8), (2, 2, "zero-bubble", 1), (4, 2, "zero-bubble", 5), (1, 1, "1f1b", 1),
])
def test_check_pipeline_accepts(pp, v, schedule, mb):
    check_pipeline(_cfg("gpt2-124m"), pp, v, schedule, mb, mb * 2)


@pytest.mark.parametrize("preset", ["gpt-tiny", "pangu-tiny"])
def test_stage_copies_keep_names_and_chain_to_the_model(preset):
    cfg = _cfg(preset, n_layer=5, block_size=16)
    specs = stage_layout(cfg, 3)
    split = spec_of(cfg).pipeline_split(cfg)
    meta = [stage_module(build_model(cfg), split, s, keep_tied=s.head) for s in specs]
    full_names = set(dict(build_model(cfg).named_parameters()))
    for spec, m in zip(specs, meta):
        names = set(dict(m.named_parameters()))
        assert names <= full_names
        assert {n.split(".")[1] for n in names if n.startswith("layers.")} == {str(b) for b in spec.blocks}
        assert ("pos_emb.weight" in names) == spec.embed
        assert ("ln_f.weight" in names) == spec.head and ("tok_emb.weight" in names) == (spec.embed or spec.head)
        if spec.head:
            assert m.lm_head.weight is m.tok_emb.weight
    assert {n for m in meta for n in dict(m.named_parameters())} == full_names

    model = materialize(build_model(cfg), "cpu", 0)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    h = x
    for spec in specs:  # copies of a materialized model carry its weights
        h = stage_module(model, split, spec, keep_tied=spec.head)(h)
    torch.testing.assert_close(h, model(x), rtol=0, atol=0)


@pytest.mark.parametrize("preset,overrides,ties", [
    ("gpt-tiny", {}, True), ("pangu-tiny", {}, True), ("llama-tiny", {}, False), ("vit-tiny", {}, False),
    ("bert-tiny", {}, True),  # the masked-LM decoder is the token embedding
    ("bert-tiny", {"n_classes": 3}, False),  # a classifier is built without that head
    ("t5-tiny", {}, True), ("t5-tiny", {"tie_embeddings": "false"}, False),  # T5 v1.1's own output projection
])
def test_the_specs_tied_pairs_follow_the_config(preset, overrides, ties):
    """The family decides from the config which pairs its pipeline split ties: exactly the pairs of
    names the model built from that config holds as one Parameter."""
    cfg = _cfg(preset, **overrides)
    split = spec_of(cfg).pipeline_split(cfg)
    model = build_model(cfg)
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    shared = {frozenset(names) for names in names_of.values() if len(names) > 1}
    assert {frozenset(pair) for pair in split.tied} == shared
    assert bool(split.tied) == ties
    last = stage_module(model, split, stage_layout(cfg, 2)[-1], keep_tied=True)
    assert hasattr(last, "tok_emb") == ties  # a last stage keeps the embedding only for a tied output


def test_a_family_gives_its_tied_pairs_by_config_not_in_its_split():
    from loom.models import ModelSpec, PipelineSplit, Sharding, register

    split = PipelineSplit(first=("tok_emb",), last=("lm_head",), tied=(("lm_head.weight", "tok_emb.weight"),))
    with pytest.raises(ValueError, match="give them as ModelSpec.tied"):
        register(ModelSpec(name="tied-in-split", build=build_model, presets={}, sharding=Sharding({}), pipeline=split))
