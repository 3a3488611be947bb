"""Typed configuration: dataclasses, a YAML file, and dotted overrides from the command line.

    loom train model=pangu-mini model.n_layer=4 train.steps=200

``model=NAME`` selects a preset of a model family (each family's folder under :mod:`loom.models` holds
its presets); the preset fills every model field that the file or the command line does not set.
Parsing and type checks are OmegaConf's; the checks that need the field's meaning (shapes that cannot
work, values out of range) are ours. Every problem is raised as :class:`ConfigError` with one line
naming the key, the value, and what would be valid.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from loom import models, tasks
from loom.data.tokenizer import MIN_VOCAB_SIZE
from loom.errors import ConfigError
from loom.models.config import DEFAULT_PRESET, ModelConfig, MoEConfig

__all__ = ["CHOICES", "Config", "ConfigError", "DataConfig", "LoRAConfig", "ModelConfig", "MoEConfig", "ParallelConfig",
           "TrainConfig", "config_to_yaml", "load_config", "task_name", "validate"]
PRESETS = models.presets()


@dataclass
class DataConfig:
    path: Optional[str] = None  # None: the Python standard library's source files
    tokenizer: str = "auto"  # auto (the task's, else bpe or jieba-sp by the text) | bpe | jieba-sp | wordpiece
    val_fraction: float = 0.01
    jsonl_field: str = "text"
    cache_dir: Optional[str] = None  # None: $LOOM_CACHE or ~/.cache/loom


@dataclass
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2022) on the linear layers named by ``targets``; rank 0: none."""

    rank: int = 0  # r: adapters of rank r train, every other weight is frozen
    alpha: float = 16.0  # the update is scaled by alpha / rank
    targets: list[str] = field(default_factory=lambda: ["*.q_proj", "*.v_proj"])  # module-name patterns


@dataclass
class TrainConfig:
    task: str = "auto"  # what the model learns (its batches, loss, metrics): auto (the family's own) | causal_lm
    steps: int = 600
    batch_size: int = 16  # sequences per optimizer step
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size / grad_accum each)
    optimizer: str = "adamw"  # adamw | lamb
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | constant
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    # seq2seq: ε of label smoothing (Szegedy et al. 2016); None: as the preset was published (0.1 for
    # transformer-*, Vaswani et al. section 5.4; else 0)
    label_smoothing: Optional[float] = None
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast, fp32 master weights) | fp64 (checking numerics)
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 10
    ckpt_every: int = 200  # 0: only at the end
    keep_checkpoints: int = 2
    run_dir: Optional[str] = None  # None: runs/<time>-<preset>
    progress: str = "auto"  # auto (a bar on a terminal, log lines otherwise) | bar | log | none
    tensorboard: bool = True  # also write the logged metrics as TensorBoard event files in RUN/tensorboard/
    # torch.compile each block (torchtitan's granularity; docs/parallelism.md "Compiling"): the same
    # losses, faster steps after the first ones, which pay for the compilation
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile's backend (aot_eager: trace without generating code)
    # start from these weights: a loom run directory (docs/encoders.md) or a Hugging Face model directory
    # (docs/huggingface.md)
    init_from: Optional[str] = None
    freeze: list[str] = field(default_factory=list)  # parameter-name patterns (fnmatch) that do not train
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class ParallelConfig:
    """How the devices are used; ``dp * ep * tp * pp`` is the number of processes. Each field is one
    dimension of the hybrid layout (docs/parallelism.md explains them)."""

    auto: bool = False  # let the planner choose every setting below for this machine (loom plan's best)
    dp: int = 1  # data-parallel replicas (each holds a slice of every batch)
    tp: int = 1  # tensor (operator) parallel: each operator's weights split over tp devices
    pp: int = 1  # pipeline stages
    ep: int = 1  # expert parallel: MoE experts split over ep ranks, which also split the batch (as dp does)
    sp: bool = False  # sequence parallel: LayerNorm/dropout activations split along the sequence over tp
    zero: int = 0  # 0 replicated | 1 optimizer state | 2 + gradients | 3 + parameters sharded over dp
    shard_group: int = 0  # ZeRO shard group size; 0 = all of dp; a divisor < dp gives hybrid sharding
    microbatches: int = 1  # pipeline micro-batches per optimizer step (per accumulation step)
    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved | zero-bubble
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved and zero-bubble)
    recompute: str = "none"  # none | selective | full
    recompute_every: int = 1  # recompute every k-th block (1: all)
    # none | optimizer (ZeRO-Offload: fp32 shards, grads, optimizer state and step on the host) | params (+ zero=3)
    offload: str = "none"
    # outer -> inner (the last on the fastest link); an order without ep places ep right inside dp
    mesh_order: list[str] = field(default_factory=lambda: ["pp", "dp", "ep", "tp"])
    strategies: dict[str, str] = field(default_factory=dict)  # module pattern -> shard strategy override
    timeout_s: float = 1800.0  # a collective that waits longer ends the job (the process group's timeout)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.arch": tuple(models.families()),
    "train.task": ("auto", *tasks.names()),
    "model.moe.router": ("switch", "top2", "noisy-topk"),
    "model.positions": ("auto", "learned", "sinusoidal", "rotary", "relative"),
    "data.tokenizer": ("auto", "bpe", "jieba-sp", "wordpiece"),  # or a folder holding one (tokenizer_is_dir)
    "train.optimizer": ("adamw", "lamb"),
    "train.schedule": ("cosine", "constant"),
    "train.precision": ("fp32", "bf16", "fp16", "fp64"),
    "train.progress": ("auto", "bar", "log", "none"),
    "parallel.schedule": ("gpipe", "1f1b", "interleaved", "zero-bubble"),
    "parallel.recompute": ("none", "selective", "full"),
    "parallel.offload": ("none", "optimizer", "params"),
}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                settings: dict[str, Any] | None = None) -> Config:
    """Build a validated :class:`Config` from an optional YAML file, ``settings`` (``section.key`` ->
    value, e.g. a saved plan's layout) and ``key=value`` overrides, each over the one before."""
    file_cfg = _read_yaml(path) if path else OmegaConf.create({})
    set_cfg = OmegaConf.create(_nested(settings or {}))
    cli_cfg = _parse_overrides(overrides or [])
    preset = _preset_name(file_cfg, set_cfg, cli_cfg)
    base = OmegaConf.structured(Config)
    try:
        base.model = OmegaConf.merge(base.model, {"preset": preset, **PRESETS[preset]})
        merged = OmegaConf.merge(base, file_cfg, set_cfg, cli_cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e)) from None
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg


def task_name(cfg: Config) -> str:
    """The task ``cfg`` trains: ``train.task``, or the model family's own for ``auto``."""
    return cfg.train.task if cfg.train.task != "auto" else models.spec_of(cfg.model).tasks[0]


def _nested(settings: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in settings.items():
        *path, leaf = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def config_to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _read_yaml(path: str | Path) -> DictConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        loaded = OmegaConf.load(p)
    except Exception as e:  # yaml.YAMLError and friends
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections (model, data, train)")
    if isinstance(loaded.get("model"), str):  # `model: gpt-mini` selects a preset
        loaded.model = {"preset": loaded.model}
    return loaded


def _parse_overrides(overrides: list[str]) -> DictConfig:
    items = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.steps=200)")
        key, value = item.split("=", 1)
        if key == "model":  # model=NAME selects a preset
            key = "model.preset"
        items.append(f"{key}={value}")
    try:
        return OmegaConf.from_dotlist(items)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse overrides {overrides}: {e.msg}") from None
    except yaml.YAMLError as e:  # YAML's own errors, e.g. an unquoted leading * (an alias in YAML)
        raise ConfigError(f"cannot parse overrides {overrides}: {str(e).splitlines()[0]} (quote patterns "
                          "that start with *, e.g. train.freeze=['*.bias'])") from None


def _preset_name(*cfgs: DictConfig) -> str:
    name = DEFAULT_PRESET
    for c in cfgs:
        model = c.get("model")
        if isinstance(model, DictConfig) and model.get("preset") is not None:
            name = str(model.preset)
    if name not in PRESETS:
        raise ConfigError(f"model={name!r} is not a known preset; valid: {', '.join(PRESETS)}"
                          + _did_you_mean(name, PRESETS))
    return name


def _explain(e: OmegaConfBaseException) -> str:
    key = e.full_key or "?"
    if isinstance(e, ConfigKeyError):
        section, _, leaf = key.rpartition(".")
        valid = _valid_keys(section)
        where = f"under {section!r}" if section else "at the top level"
        return f"unknown key {key!r}; valid keys {where}: {', '.join(valid)}" + _did_you_mean(leaf, valid)
    first_line = (e.msg or str(e) or type(e).__name__).splitlines()[0]
    section = re.search(r"subclass of (ModelConfig|DataConfig|TrainConfig|ParallelConfig)", first_line)
    if not e.full_key and section:  # `train=3` or `train: 5` in a file
        name = section.group(1).removesuffix("Config").lower()
        return (f"{name!r} is a section of settings, not a value; set its keys instead "
                f"(e.g. {name}.{_valid_keys(name)[0]}=...)")
    return f"{key}: {first_line}"


def _valid_keys(section: str) -> list[str]:
    node: Any = Config
    for part in filter(None, section.split(".")):
        node = {f.name: f for f in fields(node)}[part].default_factory  # type: ignore[misc]
    return [f.name for f in fields(node)]


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------------------------
# Validation: what the types cannot say
# --------------------------------------------------------------------------------------------


def validate(cfg: Config) -> None:
    """Raise :class:`ConfigError` on the first value that cannot work."""
    for key, allowed in CHOICES.items():
        *path, name = key.split(".")
        owner = cfg
        for part in path:
            owner = getattr(owner, part)
        value = getattr(owner, name)
        if key == "data.tokenizer" and tokenizer_is_dir(value):
            continue
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(allowed)}"
                              + _did_you_mean(str(value), allowed))
    _validate_model(cfg.model)
    _validate_train(cfg.train)
    spec = models.spec_of(cfg.model)
    if cfg.train.task != "auto" and cfg.train.task not in spec.tasks:
        raise ConfigError(f"train.task={cfg.train.task} is not one model.arch={cfg.model.arch} is trained for; "
                          f"valid: auto, {', '.join(spec.tasks)}")
    _validate_parallel(cfg.parallel)
    _validate_finetuning(cfg)
    if not 0.0 < cfg.data.val_fraction < 0.5:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be in (0, 0.5)")


def tokenizer_is_dir(value: str) -> bool:
    """Whether ``data.tokenizer`` names a folder (a Hugging Face model's or tokenizer's, or a run's
    ``tokenizer/``) rather than a kind of tokenizer to train."""
    return value not in CHOICES["data.tokenizer"] and Path(value).expanduser().is_dir()


def _check(key: str, value: float, low: float = -math.inf, high: float = math.inf,
           low_open: bool = False, high_open: bool = False) -> None:
    """``value`` must be finite and inside the interval; the message shows the interval."""
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if not math.isfinite(value) or below or above:
        lo = f"{'(' if low_open else '['}{_num(low)}" if math.isfinite(low) else "(-inf"
        hi = f"{_num(high)}{')' if high_open else ']'}" if math.isfinite(high) else "inf)"
        raise ConfigError(f"{key}={value} must be a finite number in {lo}, {hi}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


ACTIVATIONS = ("gelu_tanh", "gelu")  # model.activation: F.gelu's approximate="tanh" | "none"


def _validate_model(m: ModelConfig) -> None:
    for name in ("n_layer", "n_head", "n_embd", "block_size"):
        _check(f"model.{name}", getattr(m, name), low=1)
    _check("model.vocab_size", m.vocab_size, low=MIN_VOCAB_SIZE)  # 256 bytes + end-of-text
    if m.ffn_hidden is not None:
        _check("model.ffn_hidden", m.ffn_hidden, low=1)
    if m.n_embd % m.n_head:
        divisors = [h for h in range(1, m.n_head * 2 + 1) if m.n_embd % h == 0][-4:]
        raise ConfigError(f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}; "
                          f"heads that divide it: {', '.join(map(str, divisors))}")
    _validate_attention(m)
    spec = models.spec_of(m)
    if m.positions != "auto" and m.positions not in spec.positions:
        raise ConfigError(f"model.positions={m.positions} is not supported by model.arch={m.arch}; "
                          f"valid for it: auto ({spec.positions[0]}), {', '.join(spec.positions)}")
    if (spec.positions[0] if m.positions == "auto" else m.positions) == "rotary" and m.head_dim % 2:
        raise ConfigError(f"model.positions=rotary rotates pairs of coordinates, but the head width "
                          f"model.n_embd / model.n_head = {m.head_dim} is odd; choose an even head width")
    if spec.validate is not None:
        spec.validate(m)
    _check("model.dropout", m.dropout, 0.0, 1.0, high_open=True)
    _check("model.layer_norm_eps", m.layer_norm_eps, 0.0, low_open=True)
    if m.activation not in ACTIVATIONS:
        raise ConfigError(f"model.activation={m.activation!r} is not a GELU loom has; valid: {', '.join(ACTIVATIONS)}")
    if m.activation != "gelu_tanh" and m.moe.experts:
        raise ConfigError(f"model.activation={m.activation} is not built for Mixture-of-Experts layers (their experts "
                          "use gelu_tanh); set model.activation=gelu_tanh or model.moe.experts=0")
    _validate_moe(m)


def _validate_attention(m: ModelConfig) -> None:
    """Grouped-query heads and the rotary base."""
    if m.n_kv_head is not None:
        _check("model.n_kv_head", m.n_kv_head, 1, m.n_head)
        if m.n_head % m.n_kv_head:
            ok = [h for h in range(1, m.n_head + 1) if m.n_head % h == 0]
            raise ConfigError(f"model.n_kv_head={m.n_kv_head} does not divide model.n_head={m.n_head} (each "
                              "key/value head serves a whole group of query heads); "
                              f"choose one of {', '.join(map(str, ok))}")
    _check("model.rope_theta", m.rope_theta, 0.0, low_open=True)


def _validate_moe(m: ModelConfig) -> None:
    e = m.moe
    _check("model.moe.experts", e.experts, low=0)
    if e.experts == 0:
        return
    _check("model.moe.every", e.every, low=1)
    n_blocks = models.spec_of(m).n_blocks(m)
    if e.every > n_blocks:
        raise ConfigError(f"model.moe.every={e.every} leaves no MoE layer among the model's {n_blocks} "
                          f"decoder blocks; choose every <= {n_blocks}")
    _check("model.moe.top_k", e.top_k, 1, e.experts)
    need_k = {"switch": 1, "top2": 2}.get(e.router)
    if need_k is not None and e.top_k != need_k:
        raise ConfigError(f"model.moe.router={e.router} routes each token to {need_k} expert(s), but "
                          f"model.moe.top_k={e.top_k}; set model.moe.top_k={need_k}, or router=noisy-topk "
                          "for any k")
    if e.router == "top2" and e.experts < 2:
        raise ConfigError("model.moe.router=top2 needs model.moe.experts >= 2")
    _check("model.moe.capacity_factor", e.capacity_factor, low=0)
    _check("model.moe.aux_loss_weight", e.aux_loss_weight, low=0)
    _check("model.moe.z_loss_weight", e.z_loss_weight, low=0)
    if e.expert_ffn is not None:
        _check("model.moe.expert_ffn", e.expert_ffn, low=1)


def _validate_train(t: TrainConfig) -> None:
    for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "eval_batches"):
        _check(f"train.{name}", getattr(t, name), low=1)
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by "
                          f"train.grad_accum={t.grad_accum}; each micro-batch must hold whole sequences")
    _check("train.lr", t.lr, 0.0, low_open=True)
    _check("train.min_lr", t.min_lr, 0.0, t.lr)
    _check("train.eps", t.eps, 0.0, low_open=True)
    for name in ("warmup_steps", "ckpt_every", "grad_clip", "weight_decay", "keep_checkpoints"):
        _check(f"train.{name}", getattr(t, name), low=0)
    for name in ("beta1", "beta2"):
        _check(f"train.{name}", getattr(t, name), 0.0, 1.0, high_open=True)
    _check("train.seed", t.seed, 0, 2**32 - 1)
    if t.label_smoothing is not None:
        _check("train.label_smoothing", t.label_smoothing, 0.0, 1.0, high_open=True)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device):
        raise ConfigError(f"train.device={t.device!r} is not valid; choose auto, cpu, cuda or cuda:N")
    if t.compile:
        from torch._dynamo import list_backends  # only when asked: importing dynamo takes a second

        if t.compile_backend not in list_backends(exclude_tags=()):  # debugging backends (aot_eager) too
            usual = ["aot_eager", *list_backends()]
            raise ConfigError(f"train.compile_backend={t.compile_backend!r} is not a torch.compile backend; "
                              f"choose e.g. one of: {', '.join(usual)}" + _did_you_mean(t.compile_backend, usual))


def _validate_finetuning(cfg: Config) -> None:
    lora = cfg.train.lora
    _check("train.lora.rank", lora.rank, low=0)
    if lora.rank == 0:
        return
    _check("train.lora.alpha", lora.alpha, 0.0, low_open=True)
    if not lora.targets:
        raise ConfigError("train.lora.targets is empty; name the linear layers to adapt, e.g. [*.q_proj,*.v_proj]")


MESH_AXES = ("pp", "dp", "ep", "tp")


def _validate_parallel(p: ParallelConfig) -> None:
    """Ranges only; what depends on the model or the world size is checked by the plan."""
    for name in ("dp", "tp", "pp", "ep", "microbatches", "virtual_stages", "recompute_every"):
        _check(f"parallel.{name}", getattr(p, name), low=1)
    _check("parallel.zero", p.zero, 0, 3)
    _check("parallel.shard_group", p.shard_group, low=0)
    _check("parallel.timeout_s", p.timeout_s, low=0, low_open=True)
    if sorted(p.mesh_order) not in (sorted(MESH_AXES), sorted(set(MESH_AXES) - {"ep"})):
        raise ConfigError(f"parallel.mesh_order={list(p.mesh_order)} must order each of {', '.join(MESH_AXES)} "
                          "exactly once, outermost first (e.g. [pp, dp, ep, tp]: tp inside a node)")
