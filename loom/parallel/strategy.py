"""Shard strategies: parse them (our names or MindSpore's notation) and resolve them onto a model.

Nothing here needs a process group or real weights: resolution works on a meta-device model, so a
configuration that cannot run is rejected before any process starts.

MindSpore (semi-auto parallel) writes the strategy of a MatMul as the split of each input, e.g.
``((dp, 1), (mp, 1))``: the activation (rows, K) split dp ways along the rows, the weight split mp
ways along its first dimension. Whether that dimension is the output (N) or the reduction (K) depends
on ``transpose_b``, which the notation does not carry, so both readings are tried and the one whose
weight K split equals the activation's K split is kept:

    ((dp,1),(mp,1))    weight (N,K), N split        -> colwise   (PanGu-α's QKV and FFN mapping)
    ((dp,mp),(mp,1))   weight (K,N), K split        -> rowwise   (PanGu-α's FFN projection)
    ((dp,mp),(1,mp))   weight (N,K), K split        -> rowwise
    ((dp,1),(1,1))     nothing split                -> replicate
"""

from __future__ import annotations

import difflib
import math
import re
from fnmatch import fnmatchcase

from torch import nn

from loom.errors import ConfigError
from loom.models.common import MLP, Attention, SwiGLU
from loom.models.config import ModelConfig

STRATEGIES = ("colwise", "rowwise", "vocab", "replicate")

VALID = ("valid: colwise, rowwise, vocab, replicate, or MindSpore MatMul notation such as ((dp,1),(mp,1)) "
         "(colwise), ((dp,mp),(mp,1)) or ((dp,mp),(1,mp)) (rowwise), ((dp,1),(1,1)) (replicate)")
_NOTATION = re.compile(r"\(\((\w+),(\w+)\),\((\w+),(\w+)\)\)")
# Which strategies each module type accepts (colwise/rowwise only inside attention and MLP pairs).
_ACCEPTS = {nn.Linear: ("colwise", "rowwise", "replicate"), nn.Embedding: ("vocab", "replicate"),
            nn.LayerNorm: ("replicate",), nn.RMSNorm: ("replicate",)}
_PAIRS = ((Attention, ("q_proj", "k_proj", "v_proj", "rel_bias"), "out_proj"), (MLP, ("fc",), "proj"),
          (SwiGLU, ("gate_proj", "up_proj"), "down_proj"))


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def parse_strategy(text: str, tp: int, dp: int) -> str:
    """A strategy name or MindSpore MatMul notation -> one of ``colwise, rowwise, vocab, replicate``."""
    return _parse(text, tp, dp, "parallel.strategies")


def _parse(text: str, tp: int, dp: int, where: str) -> str:
    def bad(what: str) -> ConfigError:
        return ConfigError(f"{where}: strategy {text!r} {what}; {VALID}")

    s = re.sub(r"\s+", "", str(text)).lower().replace("[", "(").replace("]", ")")
    if s in STRATEGIES:
        return s
    m = _NOTATION.fullmatch(s)
    if not m:
        return _raise(bad("is neither a strategy name nor MindSpore notation ((rows,K),(weight dim 0,weight dim 1))"))
    rows, k, w0, w1 = m.groups()
    if not (rows in ("dp", "1") or rows == str(dp)):
        _raise(bad(f"splits the activation's rows by {rows!r}; rows split only over data parallelism "
                   f"(dp, 1 or parallel.dp={dp})"))

    def axis(name: str) -> str:  # -> "mp" (split over tp) or "1"
        if name in ("mp", "tp"):
            return "mp"
        if name.isdigit() and int(name) in (1, tp):
            return "1" if int(name) == 1 else "mp"
        if name == "dp":
            _raise(bad("splits K or the weight by dp; those split only over mp/tp"))
        return _raise(bad(f"has axis {name!r}; use mp or tp, 1 (not split) or parallel.tp={tp}"))

    k, w0, w1 = axis(k), axis(w0), axis(w1)
    if w0 == w1 == "mp":
        _raise(bad("splits the weight along both dimensions (a 2-D weight split is not supported)"))
    # (N,K) layout (transpose_b=True, torch's nn.Linear) or (K,N) (transpose_b=False): keep the
    # reading whose K split equals the activation's.
    for n_split, k_split in ((w0, w1), (w1, w0)):
        if k_split == k:
            return "colwise" if n_split == "mp" else "rowwise" if k_split == "mp" else "replicate"
    return _raise(bad(f"splits the activation's K {'by mp' if k == 'mp' else 'not at all'} but the weight's K "
                      "differently in either layout (N,K) or (K,N); the two K splits must agree"))


def _raise(e: ConfigError):
    raise e


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------


def resolve_strategies(model: nn.Module, table: dict[str, str], overrides: dict[str, str],
                       tp: int, dp: int) -> dict[str, str]:
    """Every module that a pattern of ``table`` or ``overrides`` names -> its strategy.

    Patterns are applied in order, table first, so a later pattern wins. Only modules that own
    weights are assigned (a pattern such as ``layers.*.attn.*`` skips the dropout). An override
    that names no module, a strategy its module cannot take, or a split that does not divide the
    shape is a :class:`ConfigError`."""
    names = [n for n, _ in model.named_modules()]
    weighted = {n: m for n, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None}
    resolved: dict[str, str] = {}
    for is_override, patterns in ((False, table), (True, overrides)):
        for pattern, text in patterns.items():
            hits = [n for n in names if fnmatchcase(n, pattern)]
            owners = [n for n in hits if n in weighted]
            if is_override and not owners:
                raise ConfigError(_no_module(pattern, hits, model, weighted))
            strategy = _parse(text, tp, dp, f"parallel.strategies[{pattern!r}]")
            resolved.update(dict.fromkeys(owners, strategy))
    resolved = {n: resolved[n] for n in weighted if n in resolved}  # in model order
    check_strategies(model, resolved, tp)
    return resolved


def _no_module(pattern: str, hits: list[str], model: nn.Module, weighted: dict) -> str:
    looks = ", ".join(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in weighted))
    if hits:
        kind = type(model.get_submodule(hits[0])).__name__
        return (f"parallel.strategies: {pattern!r} names {kind} modules, which own no weights; name the modules "
                f"with weights inside them; those look like: {looks}")
    close = difflib.get_close_matches(pattern, looks.split(", "), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"parallel.strategies: {pattern!r} names no module of this model{hint}; modules look like: {looks}"


def check_strategies(model: nn.Module, strategies: dict[str, str], tp: int) -> None:
    """Raise :class:`ConfigError` if a resolved ``strategies`` (module name -> name) cannot run:
    a strategy its module type does not take, a split that does not divide the shape, an attention
    or MLP whose projections do not pair up, or a tied weight split two ways. Names of modules that
    ``model`` does not hold (another pipeline stage's) are skipped."""
    cfg = getattr(model, "cfg", None)
    modules = dict(model.named_modules())
    paired = {f"{prefix}.{c}" for prefix, mod in modules.items() for kind, producers, consumer in _PAIRS
              if isinstance(mod, kind) for c in (*producers, consumer) if hasattr(mod, c)}
    for name, s in strategies.items():
        if name not in modules:
            continue  # held by another pipeline stage
        mod = modules[name]
        accepts = next((v for t, v in _ACCEPTS.items() if isinstance(mod, t)), ("replicate",))
        if isinstance(mod, nn.Linear) and name not in paired:
            # an output projection: split over its outputs (the vocabulary), or whole; colwise/rowwise
            # only for the projections of attention and MLP, which pair up
            accepts = ("vocab", "replicate")
        if s not in accepts:
            raise ConfigError(f"parallel.strategies: {s!r} cannot apply to {name!r} ({type(mod).__name__}); "
                              f"valid for it: {', '.join(accepts)}")
        if s == "vocab":
            rows = mod.num_embeddings if isinstance(mod, nn.Embedding) else mod.out_features
            key = _field(cfg, rows, ("vocab_size", "block_size"))
            pad = (f"pad the vocabulary, model.vocab_size={padded_vocab(rows, tp)} (rows past the tokenizer's "
                   "are never targets nor sampled), or ") if key == "model.vocab_size" else ""
            _divisible(rows, tp, key, f"{name} splits its rows",
                       f"or {pad}set parallel.strategies {name!r} (and any weight tied to it) to replicate")
    for kind, producers, consumer in _PAIRS:
        for prefix, mod in modules.items():
            if isinstance(mod, kind):
                _check_pair(prefix, mod, producers, consumer, strategies, tp)
    tied: dict[int, list[str]] = {}
    for name, mod in modules.items():
        for p in mod.parameters(recurse=False):
            tied.setdefault(id(p), []).append(name)
    for owners in (o for o in tied.values() if len(o) > 1):
        splits = {strategies.get(n, "replicate") for n in owners}
        if len(splits) > 1:
            raise ConfigError(f"parallel.strategies: {' and '.join(map(repr, owners))} share one tied weight but "
                              f"are given {' and '.join(strategies.get(n, 'replicate') for n in owners)}; "
                              "give them the same strategy (vocab or replicate)")


def _check_pair(prefix: str, mod: nn.Module, producers: tuple[str, ...], consumer: str,
                strategies: dict[str, str], tp: int) -> None:
    """Megatron-LM's pairing: colwise producers feed a rowwise consumer with their split output, so
    they go together (or all replicate)."""
    producers = tuple(c for c in producers if hasattr(mod, c))  # an optional one (rel_bias) may be absent
    names = [f"{prefix}.{c}" for c in (*producers, consumer)]
    got = tuple(strategies.get(n, "replicate") for n in names)
    if got not in (("colwise",) * len(producers) + ("rowwise",), ("replicate",) * len(names)):
        raise ConfigError(f"parallel.strategies: {', '.join(f'{n}={s}' for n, s in zip(names, got))} do not pair "
                          f"up; {'/'.join(producers)} colwise must feed {consumer} rowwise (Megatron-LM), "
                          "or all replicate")
    if got[-1] == "rowwise":
        every = re.sub(r"\.\d+(?=\.|$)", ".*", prefix)  # layers.0.attn -> layers.*.attn
        if isinstance(mod, Attention):
            heads = mod.q_proj.out_features // mod.head_dim
            _divisible(heads, tp, "model.n_head", f"{prefix} splits by whole heads",
                       f"or set parallel.strategies '{every}.*' to replicate")
            kv_heads = mod.k_proj.out_features // mod.head_dim  # grouped-query: fewer key/value heads
            _divisible(kv_heads, tp, "model.n_kv_head", f"{prefix} splits its key/value heads, each rank "
                       "keeping whole groups of query heads", f"or set model.n_kv_head to a multiple of {tp}, "
                       f"or parallel.strategies '{every}.*' to replicate")
        else:
            _divisible(getattr(mod, consumer).in_features, tp, "model.ffn_hidden", f"{prefix} splits its features",
                       f"or set parallel.strategies '{every}.*' to replicate")


def _field(cfg: ModelConfig | None, value: int, fields: tuple[str, ...]) -> str:
    """The config field that holds ``value`` (for messages), or a neutral description."""
    return next((f"model.{f}" for f in fields if cfg is not None and getattr(cfg, f, None) == value), "the size")


def _divisible(n: int, tp: int, key: str, why: str, fix: str) -> None:
    if n % tp:
        ok = [d for d in range(1, n + 1) if n % d == 0][-6:]
        raise ConfigError(f"{key}={n} is not divisible by parallel.tp={tp} ({why}); "
                          f"choose a tp that divides it (e.g. {', '.join(map(str, ok))}) {fix}")


VOCAB_MULTIPLE = 128  # what Megatron-LM pads the vocabulary to (make-vocab-size-divisible-by)


def padded_vocab(vocab: int, tp: int) -> int:
    """``vocab`` if ``tp`` divides it, else the next multiple of lcm(128, tp): the rows a tensor-parallel
    embedding and output layer need (Megatron-LM pads the same way)."""
    if vocab % tp == 0:
        return vocab
    multiple = math.lcm(VOCAB_MULTIPLE, tp)
    return -(-vocab // multiple) * multiple
