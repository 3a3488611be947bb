"""``train.init_from=RUN_DIR``: start a run from another run's weights (fine-tuning).

Only the model's weights come over, not the optimizer's state, the step or the random state: the
new run starts at step 0 with fresh moments. Weights are matched by name and shape: those of the
other run's newest checkpoint that this model also has are loaded (under any layout: DCP reads
each shard by its global offsets), those this model lacks are dropped (the heads the new task does
not use: a pretraining run's masked-LM and next-sentence heads), and this model's own that the
checkpoint lacks keep their fresh initialization (a new classifier). A classifier whose class count
differs from the other run's (the family's ``class_heads``: a ViT trained on the digits fine-tuned on a
folder of two classes) is initialized afresh too; any other weight of another shape is an error.

The new run's model is the other run's: :func:`run_init_config` takes its ``model`` section (its
``config.yaml``) as the defaults, as a Hugging Face directory's ``config.json`` is taken, and refuses
up front, in one line, a ``model.*`` setting that would change which weights the model has or their
shapes (rather than a shape error when the checkpoint loads).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from loom.config import PRESETS, Config, load_config
from loom.errors import ConfigError
from loom.models import build_model
from loom.models.config import ModelConfig
from loom.train.checkpoint import _single_process_is_intended, latest_checkpoint
from loom.train.rundir import load_run_config

log = logging.getLogger("loom.train")


@dataclass(frozen=True)
class InitReport:
    loaded: tuple[str, ...]  # weights taken from the other run
    fresh: tuple[str, ...]  # this model's weights the other run lacks: initialized
    dropped: tuple[str, ...]  # the other run's weights this model lacks
    resized: tuple[str, ...] = ()  # of the fresh ones: class heads for another number of classes


def init_from_run(run_dir: str | Path, modules: list[nn.Module], class_heads: tuple[str, ...] = ()) -> InitReport:
    """Load the weights of ``run_dir``'s newest checkpoint that the model parts ``modules`` (this
    rank's, in any layout) share by name and shape; those of the modules ``class_heads`` whose shape
    differs keep their fresh initialization. Every rank of the job calls it."""
    ckpt = latest_checkpoint(Path(run_dir).expanduser())
    if ckpt is None:
        raise ConfigError(f"train.init_from={str(run_dir)!r} holds no complete checkpoint (checkpoints/step_*); "
                          "give the directory of a finished loom run")
    saved = {k[len("model."):]: m for k, m in dcp.FileSystemReader(str(ckpt)).read_metadata()
             .state_dict_metadata.items() if k.startswith("model.")}
    states = [get_model_state_dict(m) for m in modules]
    mine = {k: v for sd in states for k, v in sd.items()}
    resized = tuple(sorted(k for k, v in mine.items() if k in saved and tuple(saved[k].size) != tuple(v.shape)))
    for name in resized:
        if not name.startswith(tuple(f"{h}." for h in class_heads)):
            raise ConfigError(f"train.init_from: {name} is {tuple(saved[name].size)} in {ckpt} but "
                              f"{tuple(mine[name].shape)} here; keep the model's shape (model.*) of that run")
    shared = {k: v for k, v in mine.items() if k in saved and k not in resized}
    with _single_process_is_intended():
        dcp.load({"model": shared}, checkpoint_id=ckpt)
    for m, sd in zip(modules, states):
        set_model_state_dict(m, {k: shared[k] for k in sd if k in shared}, options=StateDictOptions(strict=False))
    report = InitReport(tuple(sorted(shared)), tuple(sorted(set(mine) - set(shared))),
                        tuple(sorted(set(saved) - set(mine))), resized)
    log.info("initialized from %s: %d weights loaded, %d new (%s%s), %d dropped (%s)", ckpt, len(report.loaded),
             len(report.fresh), ", ".join(report.fresh) or "-",
             f"; {', '.join(resized)} for another number of classes" if resized else "",
             len(report.dropped), ", ".join(report.dropped) or "-")
    return report


# --------------------------------------------------------------------------------------------
# The config of a run that starts from a loom run
# --------------------------------------------------------------------------------------------


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is a loom run directory (it holds the ``config.yaml`` every run writes)."""
    return (Path(path).expanduser() / "config.yaml").is_file()


def run_init_config(path: str | Path, overrides: list[str] | None = None, config_file: str | None = None,
                    settings: dict | None = None) -> Config:
    """The config of a run that starts from the loom run ``path``: that run's ``model`` section as the
    defaults (over ``config_file``'s, under ``settings`` and ``overrides``), except its class count:
    ``model.n_classes=0``, the new data's (a class head of another count starts afresh). ``model=NAME``
    is the run's model, not the preset's: accepted when it names the run's preset or one with the same
    weights, one line otherwise. Any ``model.*`` setting that changes the run's weights (which there
    are, or their shapes: ``n_layer``, ``n_embd``, ``vocab_size``, ...) is one line too; those that
    keep them (``dropout``, ``n_classes``, ``rope_theta``, ...) apply."""
    saved = load_run_config(Path(path).expanduser()).model
    model = {f"model.{k}": v for k, v in dataclasses.asdict(saved).items()}
    model["model.n_classes"] = 0
    cfg = load_config(config_file, [*(overrides or []), f"train.init_from={path}"], {**model, **(settings or {})})
    if cfg.model.preset != saved.preset:  # model=NAME on the command line
        _check_preset(path, saved, cfg.model.preset)
        cfg.model.preset = saved.preset
    _check_same_weights(path, saved, cfg.model)
    return cfg


def _check_preset(path: str | Path, saved: ModelConfig, name: str) -> None:
    preset = PRESETS[name]
    if preset["arch"] != saved.arch:
        raise ConfigError(f"train.init_from={path} is a model.arch={saved.arch} run (model={saved.preset}); "
                          f"model={name} is a {preset['arch']}: leave model= out, the run's model is the one "
                          "fine-tuned")
    values = {k: v for k, v in _flat(preset).items() if k != "n_classes" and _get(saved, k) != v}
    named = saved
    for key, value in values.items():
        named = _set(named, key, value)
    diff = _weight_difference(saved, named)
    if diff:
        ours = ", ".join(f"{k}={_show(v)}" for k, v in values.items())
        theirs = ", ".join(f"{k}={_show(_get(saved, k))}" for k in values)
        raise ConfigError(f"train.init_from={path}: model={name} ({ours}; the run has {theirs}) would change the "
                          f"run's weights ({diff}); leave model= out, the run's model (model={saved.preset}) is the "
                          "one fine-tuned")


def _check_same_weights(path: str | Path, saved: ModelConfig, model: ModelConfig) -> None:
    """One line naming the settings of ``model`` that give other weights than the run's ``saved``."""
    base = dataclasses.replace(saved, preset=model.preset, n_classes=model.n_classes)  # a class head may change
    changed = [k for k in _flat(dataclasses.asdict(base)) if _get(base, k) != _get(model, k)]
    if not changed:
        return
    diff = _weight_difference(base, model)
    if not diff:
        return
    culprits = [k for k in changed if _weight_difference(base, _set(base, k, _get(model, k)))] or changed
    given = ", ".join(f"model.{k}={_show(_get(model, k))} (the run's {_show(_get(base, k))})" for k in culprits)
    raise ConfigError(f"train.init_from={path}: {given} would change the run's weights ({diff}); fine-tuning "
                      f"keeps the run's model: leave {', '.join(f'model.{k}' for k in culprits)} out")


def _weight_difference(old: ModelConfig, new: ModelConfig) -> str:
    """The first weight that differs between the models ``old`` and ``new`` build (built on the meta
    device: nothing allocated), said in words; empty when every weight is the same name and shape."""
    a = _weight_shapes(old)
    try:
        b = _weight_shapes(new)
    except (ConfigError, ValueError, RuntimeError) as e:  # a setting the run's other settings do not fit
        return f"the model cannot be built: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    for name in b:  # in the model's order: the embedding before the blocks before the head
        if name not in a:
            return f"the run has no {name}"
        if a[name] != b[name]:
            return f"{name} is {a[name]} there, {b[name]} here"
    return next((f"this model has no {name}" for name in a if name not in b), "")


def _weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}


def _show(value) -> str:
    """A setting as it is written on the command line (``false``, not ``False``)."""
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


def _flat(settings: dict, prefix: str = "") -> dict:
    """Settings (a preset's, a model config's ``asdict``) as dotted keys (``moe: {experts: 8}`` ->
    ``moe.experts``)."""
    out: dict = {}
    for k, v in settings.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _set(cfg, key: str, value):
    head, _, rest = key.partition(".")
    return dataclasses.replace(cfg, **{head: _set(getattr(cfg, head), rest, value) if rest else value})
