"""The strategy search: every layout of a model on a cluster, costed, the ones that fit ranked by
predicted step time.

Enumerated: dp × tp × pp × ep factorizations of the device count (tp a divisor of the devices in a node
and of the heads and FFN width, so tensor parallelism stays on the fast links; pp at most the number of
blocks; ep a divisor of the experts), ZeRO stage, recomputation, sequence parallelism, micro-batch
size, pipeline schedule and virtual stages. A few thousand candidates for thousands of devices: the
cost model is closed-form, so the whole search takes seconds.

Pipeline schedules searched (:func:`schedules`): 1F1B, interleaved with 2–4 virtual stages, and GPipe.
GPipe is predicted as fast as 1F1B (the same bubble) and holds every micro-batch's activations, not
pp of them; it is searched because it is the one schedule the engine runs with fewer micro-batches
than stages. Zero-bubble is not searched: the cost model prices it only roughly (ZB-H1's third of the
bubble on top of two stages per rank; the interleaved schedule's activations), no measured run checks
that price, and it would win every pipeline layout on it. ``--fix schedule=zero-bubble`` evaluates it.

Ranking (:func:`rank_key`): layouts that fit first, then by predicted step time; at equal time the
schedule earlier in :data:`SCHEDULE_PREFERENCE` (1F1B above GPipe, which ties with it on time and never
holds less), and then the order of enumeration (the smaller ZeRO stage, micro-batch and recomputation
first: the simpler layout, where the cost model sees no difference).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from loom.config import CHOICES, ConfigError, ModelConfig
from loom.models import n_blocks, spec_of
from loom.parallel.plan import Plan, check_schedule
from loom.parallel.strategy import padded_vocab
from loom.planner.cost import Estimate, estimate, padded_model, plan_for_batch
from loom.planner.hardware import Cluster
from loom.planner.shape import model_shape

MICRO_BATCHES = (1, 2, 4, 8, 16)
RECOMPUTE = CHOICES["parallel.recompute"]
SCHEDULES = CHOICES["parallel.schedule"]
# at equal predicted time, the schedule preferred: fewest micro-batches in flight first
SCHEDULE_PREFERENCE = ("1f1b", "interleaved", "zero-bubble", "gpipe")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Candidate:
    plan: Plan
    vocab_size: int = 0  # the vocabulary padded for tp (0: the model's own)


def schedules(pp: int, microbatches: int, blocks: int) -> list[tuple[str, int]]:
    """The (schedule, virtual stages) the engine runs for ``pp`` ranks, ``microbatches`` per step and
    ``blocks`` blocks: 1F1B with at least pp micro-batches; interleaved with v = 2, 3, 4 where pp·v
    divides the blocks and pp the micro-batches; GPipe always (the only one with fewer than pp)."""
    if pp == 1:
        return [("1f1b", 1)]
    if microbatches < pp:
        return [("gpipe", 1)]
    out = [("1f1b", 1)] + [("interleaved", v) for v in (2, 3, 4) if not blocks % (pp * v) and not microbatches % pp]
    return out + [("gpipe", 1)]


def candidates(cfg: ModelConfig, cluster: Cluster, global_batch: int) -> list[Candidate]:
    world = cluster.devices
    blocks = n_blocks(cfg)
    experts = cfg.moe.experts
    split_sequence = not spec_of(cfg).no_sequence_parallel  # sequence parallelism wherever tp > 1, if it can
    out = []
    for tp in _divisors(min(world, cluster.devices_per_node)):
        if cfg.n_head % tp or cfg.kv_heads % tp or cfg.ffn % tp:
            continue
        # a vocabulary tp does not divide is padded, as Megatron-LM does (the plan sets model.vocab_size)
        vocab = padded_vocab(cfg.vocab_size, tp)
        vocab = 0 if vocab == cfg.vocab_size else vocab
        for pp in _divisors(world // tp):
            if pp > blocks:
                continue
            for ep in (_divisors(world // (tp * pp)) if experts else [1]):
                if experts and experts % ep:
                    continue
                dp = world // (tp * pp * ep)
                replicas = dp * ep
                if global_batch % replicas:
                    continue
                for mb in MICRO_BATCHES:
                    per_replica = global_batch // replicas
                    if per_replica % mb:
                        continue
                    for schedule, v in schedules(pp, per_replica // mb, blocks):
                        for zero in ((0, 1, 2, 3) if replicas > 1 else (0,)):
                            for recompute in RECOMPUTE:
                                plan = plan_for_batch(global_batch, mb, dp=dp, tp=tp, pp=pp, ep=ep,
                                                      sp=tp > 1 and split_sequence, zero=zero, recompute=recompute,
                                                      schedule=schedule, virtual_stages=v)
                                out.append(Candidate(plan, vocab))
    return out


def search(cfg: ModelConfig, cluster: Cluster, global_batch: int, seq: int) -> list[Estimate]:
    """Every candidate's estimate, those that fit first, fastest first."""
    found = candidates(cfg, cluster, global_batch)
    if not found:
        raise ConfigError(f"no layout of {cluster.devices} devices splits a batch of {global_batch} sequences "
                          f"for this model; use a batch divisible by more of the device count's factors")
    shapes = {}  # one per vocabulary size (padded for some tp)
    estimates = []
    for c in found:
        if c.vocab_size not in shapes:
            shapes[c.vocab_size] = model_shape(padded_model(cfg, c.vocab_size), seq)
        estimates.append(estimate(cfg, c.plan, cluster, global_batch, seq, shape=shapes[c.vocab_size],
                                  vocab_size=c.vocab_size))
    return sorted(estimates, key=rank_key)


def rank_key(e: Estimate) -> tuple:
    """The search's order (a stable sort keeps the enumeration's order beyond it): fitting first, fastest
    first, and at equal time the schedule earlier in :data:`SCHEDULE_PREFERENCE` (1F1B before GPipe,
    which ties with it on time and holds at least as many micro-batches' activations)."""
    return (not e.fits, e.step_time_s, SCHEDULE_PREFERENCE.index(e.plan.schedule))


FIX_KEYS = ("dp", "tp", "pp", "ep", "sp", "zero", "recompute", "schedule", "virtual_stages", "micro_batch",
            "vocab_size")


def parse_fix(text: str) -> dict:
    """``tp=8,pp=16,dp=16,zero=1,recompute=full,mb=1,schedule=interleaved,v=2`` -> the settings, typed;
    ``micro_batch`` defaults to 1, ``vocab_size`` to 0 (the model's)."""
    types = {f.name: type(f.default) for f in fields(Plan)} | {"micro_batch": int, "vocab_size": int}
    fix: dict = {"micro_batch": 1, "vocab_size": 0}
    given = set()
    names = {"mb": "micro_batch", "v": "virtual_stages"}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = item.partition("=")
        key = names.get(key.strip(), key.strip())
        if key not in FIX_KEYS or not value:
            raise ConfigError(f"--fix {text!r}: {item!r} is not KEY=VALUE with KEY one of dp, tp, pp, ep, sp, zero, "
                              "recompute, schedule, v (virtual stages), mb (micro-batch size)")
        kind = types[key]
        try:
            parsed = (value.strip().lower() in ("1", "true", "yes")) if kind is bool else kind(value.strip())
        except ValueError:
            raise ConfigError(f"--fix {text!r}: {key}={value!r} is not a {kind.__name__}") from None
        fix[key] = parsed
        given.add(key)
    schedule, v = fix.get("schedule", "1f1b"), fix.get("virtual_stages", 1)
    if schedule not in SCHEDULES:
        raise ConfigError(f"--fix schedule={schedule}: use one of {', '.join(SCHEDULES)}")
    if fix.get("recompute", "none") not in RECOMPUTE:
        raise ConfigError(f"--fix recompute={fix['recompute']}: use one of {', '.join(RECOMPUTE)}")
    if "schedule" not in given and v > 1:  # v=2 alone means the interleaved schedule
        fix["schedule"] = schedule = "interleaved"
    if schedule == "zero-bubble" and "virtual_stages" not in given:  # ZB-V: two stages per rank
        fix["virtual_stages"] = v = 2
    if fix.get("pp", 1) > 1:
        from loom.parallel.pipeline import check_pipeline_shape

        check_pipeline_shape(schedule, v, "--fix v", "--fix schedule")
    return fix


def fixed_plan(cfg: ModelConfig, text: str, cluster: Cluster, global_batch: int) -> Candidate:
    """``--fix``'s plan for batches of ``global_batch``, checked (:func:`check_fixed`); its vocabulary
    padded for its tp when tp does not divide it and no ``vocab_size`` is given."""
    fix = parse_fix(text)
    mb, vocab = fix.pop("micro_batch"), fix.pop("vocab_size")
    plan = plan_for_batch(global_batch, mb, **fix)
    if not vocab and cfg.vocab_size % plan.tp:
        vocab = padded_vocab(cfg.vocab_size, plan.tp)
    check_fixed(cfg, plan, cluster, global_batch, vocab)
    return Candidate(plan, vocab)


def check_fixed(cfg: ModelConfig, plan: Plan, cluster: Cluster, global_batch: int, vocab_size: int = 0) -> None:
    """Errors that make a given plan impossible on ``cluster`` for ``cfg`` (its vocabulary padded to
    ``vocab_size``, if given) and batches of ``global_batch``, one line each."""
    if plan.world_size != cluster.devices:
        raise ConfigError(f"--fix: dp × ep × tp × pp = {plan.world_size}, but the cluster has {cluster.devices} "
                          "devices; make the product equal")
    steps = plan.microbatches * plan.grad_accum
    if global_batch % (plan.data_parallel * steps):
        raise ConfigError(f"--global-batch {global_batch} does not split into dp × ep = {plan.data_parallel} "
                          f"replicas of {steps} micro-batch(es) of whole sequences")
    for name, value in (("model.n_head", cfg.n_head), ("model.n_kv_head", cfg.kv_heads), ("model.ffn", cfg.ffn)):
        if value % plan.tp:
            raise ConfigError(f"--fix tp={plan.tp} does not divide {name}={value}")
    rows = vocab_size or cfg.vocab_size
    if rows < cfg.vocab_size or rows % plan.tp:
        raise ConfigError(f"--fix vocab_size={rows}: the embedding rows must be at least model.vocab_size="
                          f"{cfg.vocab_size} and divisible by tp={plan.tp} (e.g. vocab_size="
                          f"{padded_vocab(cfg.vocab_size, plan.tp)}, or leave it out: it is padded for you)")
    if plan.ep > 1 and (not cfg.moe.experts or cfg.moe.experts % plan.ep):
        raise ConfigError(f"--fix ep={plan.ep} must divide the model's experts ({cfg.moe.experts})")
    check_schedule(plan, cfg)  # what `loom train` refuses: zero-bubble for T5's carried position bias
