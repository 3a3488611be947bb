"""The strategy search: every layout of a model on a cluster, costed, the ones that fit ranked by
predicted step time.

Enumerated: dp × tp × pp × ep factorizations of the device count (tp a divisor of the devices in a node
and of the heads and FFN width, so tensor parallelism stays on the fast links; pp at most the number of
blocks; ep a divisor of the experts), ZeRO stage, recomputation, sequence parallelism, micro-batch
size, pipeline schedule and virtual stages. A few thousand candidates for thousands of devices: the
cost model is closed-form, so the whole search takes seconds.
"""

from __future__ import annotations

from dataclasses import replace

from loom.config import CHOICES, ConfigError, ModelConfig
from loom.parallel.strategy import padded_vocab
from loom.planner.cost import Estimate, Layout, estimate, layout_model, model_shape
from loom.planner.hardware import Cluster

MICRO_BATCHES = (1, 2, 4, 8, 16)
RECOMPUTE = CHOICES["parallel.recompute"]
SCHEDULES = CHOICES["parallel.schedule"]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(cfg: ModelConfig, cluster: Cluster, global_batch: int) -> list[Layout]:
    world = cluster.devices
    blocks = cfg.n_layer - 1 if cfg.arch == "pangu" else cfg.n_layer
    experts = cfg.moe.experts
    out = []
    for tp in _divisors(min(world, cluster.devices_per_node)):
        if cfg.n_head % tp or cfg.ffn % tp:
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
                    if per_replica % mb or (pp > 1 and per_replica // mb < pp):
                        continue
                    schedules = [("1f1b", 1)] if pp == 1 else [("1f1b", 1)] + [("interleaved", v) for v in (2, 3, 4)]
                    for schedule, v in schedules:
                        if v > 1 and (blocks % (pp * v) or (per_replica // mb) % pp):
                            continue
                        for zero in ((0, 1, 2, 3) if replicas > 1 else (0,)):
                            for recompute in RECOMPUTE:
                                out.append(Layout(dp=dp, tp=tp, pp=pp, ep=ep, sp=tp > 1, zero=zero,
                                                  recompute=recompute, schedule=schedule, virtual_stages=v,
                                                  micro_batch=mb, vocab_size=vocab))
    return out


def search(cfg: ModelConfig, cluster: Cluster, global_batch: int, seq: int) -> list[Estimate]:
    """Every candidate's estimate, those that fit first, fastest first."""
    layouts = candidates(cfg, cluster, global_batch)
    if not layouts:
        raise ConfigError(f"no layout of {cluster.devices} devices splits a batch of {global_batch} sequences "
                          f"for this model; use a batch divisible by more of the device count's factors")
    shapes = {}  # one per vocabulary size (padded for some tp)
    estimates = []
    for layout in layouts:
        if layout.vocab_size not in shapes:
            shapes[layout.vocab_size] = model_shape(layout_model(cfg, layout), seq)
        estimates.append(estimate(cfg, layout, cluster, global_batch, seq, shape=shapes[layout.vocab_size]))
    return sorted(estimates, key=lambda e: (not e.fits, e.step_time_s))


def parse_fix(text: str) -> Layout:
    """``tp=8,pp=16,dp=16,zero=1,recompute=full,mb=1,schedule=interleaved,v=2`` -> a Layout."""
    layout, given = Layout(), set()
    names = {"mb": "micro_batch", "v": "virtual_stages", "micro_batch": "micro_batch",
             "virtual_stages": "virtual_stages"}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = item.partition("=")
        key = names.get(key.strip(), key.strip())
        if key not in Layout.__dataclass_fields__ or not value:
            raise ConfigError(f"--fix {text!r}: {item!r} is not KEY=VALUE with KEY one of dp, tp, pp, ep, sp, zero, "
                              "recompute, schedule, v (virtual stages), mb (micro-batch size)")
        kind = type(getattr(layout, key))
        try:
            parsed = (value.strip().lower() in ("1", "true", "yes")) if kind is bool else kind(value.strip())
        except ValueError:
            raise ConfigError(f"--fix {text!r}: {key}={value!r} is not a {kind.__name__}") from None
        layout = replace(layout, **{key: parsed})
        given.add(key)
    if layout.schedule not in SCHEDULES:
        raise ConfigError(f"--fix schedule={layout.schedule}: use one of {', '.join(SCHEDULES)}")
    if layout.recompute not in RECOMPUTE:
        raise ConfigError(f"--fix recompute={layout.recompute}: use one of {', '.join(RECOMPUTE)}")
    if "schedule" not in given and layout.virtual_stages > 1:  # v=2 alone means the interleaved schedule
        layout = replace(layout, schedule="interleaved")
    if layout.schedule == "zero-bubble" and "virtual_stages" not in given:  # ZB-V: two stages per rank
        layout = replace(layout, virtual_stages=2)
    if layout.pp > 1:
        from loom.parallel.pipeline import check_pipeline_shape

        check_pipeline_shape(layout.schedule, layout.virtual_stages, "--fix v", "--fix schedule")
    return layout


def fixed_layout(cfg: ModelConfig, text: str) -> Layout:
    """``--fix``'s layout, its vocabulary padded for its tp when tp does not divide it and no
    ``vocab_size`` is given."""
    layout = parse_fix(text)
    if not layout.vocab_size and cfg.vocab_size % layout.tp:
        layout = replace(layout, vocab_size=padded_vocab(cfg.vocab_size, layout.tp))
    return layout


def check_layout(cfg: ModelConfig, layout: Layout, cluster: Cluster, global_batch: int) -> None:
    """Errors that make a fixed layout impossible, one line each."""
    if layout.world_size != cluster.devices:
        raise ConfigError(f"--fix: dp × ep × tp × pp = {layout.world_size}, but the cluster has {cluster.devices} "
                          "devices; make the product equal")
    replicas = layout.dp * layout.ep
    if global_batch % (replicas * layout.micro_batch):
        raise ConfigError(f"--global-batch {global_batch} does not split into dp × ep = {replicas} replicas of "
                          f"micro-batches of {layout.micro_batch}")
    for name, value in (("model.n_head", cfg.n_head), ("model.ffn", cfg.ffn)):
        if value % layout.tp:
            raise ConfigError(f"--fix tp={layout.tp} does not divide {name}={value}")
    vocab = layout.vocab_size or cfg.vocab_size
    if vocab < cfg.vocab_size or vocab % layout.tp:
        raise ConfigError(f"--fix vocab_size={vocab}: the embedding rows must be at least model.vocab_size="
                          f"{cfg.vocab_size} and divisible by tp={layout.tp} (e.g. vocab_size="
                          f"{padded_vocab(cfg.vocab_size, layout.tp)}, or leave it out: it is padded for you)")
    if layout.ep > 1 and (not cfg.moe.experts or cfg.moe.experts % layout.ep):
        raise ConfigError(f"--fix ep={layout.ep} must divide the model's experts ({cfg.moe.experts})")
