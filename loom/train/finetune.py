"""Fine-tuning's model transformations, applied to the model built on the meta device before it is
parallelized (so every layout splits the adapted model): LoRA adapters (:mod:`loom.models.lora`) and
frozen parameters (``train.freeze``: ``fnmatch`` patterns over parameter names, ``*`` crossing dots).
A frozen parameter gets no gradient and no optimizer state; with LoRA, everything but the adapters is
frozen."""

from __future__ import annotations

import fnmatch

from torch import nn

from loom.config import ConfigError, TrainConfig
from loom.models.lora import apply_lora, is_lora_param


def adapt(model: nn.Module, t: TrainConfig) -> nn.Module:
    """``model`` with the run's LoRA adapters (what its checkpoints hold); nothing frozen yet."""
    if t.lora.rank > 0 and not apply_lora(model, t.lora.rank, t.lora.alpha, list(t.lora.targets)):
        linears = [n for n, m in model.named_modules() if type(m) is nn.Linear][:4]
        raise ConfigError(f"train.lora.targets={list(t.lora.targets)} names no linear layer of the model; "
                          f"its linear layers are named like {', '.join(linears)}")
    return model


def prepare_for_finetuning(model: nn.Module, t: TrainConfig) -> nn.Module:
    """Add the LoRA adapters and freeze what does not train."""
    adapt(model, t)
    names = [n for n, _ in model.named_parameters()]
    for pat in t.freeze:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise ConfigError(f"train.freeze pattern {pat!r} names no parameter; parameters are named like "
                              f"{', '.join(names[:3])}")
    for name, p in model.named_parameters():
        frozen = (t.lora.rank > 0 and not is_lora_param(name)) or any(fnmatch.fnmatchcase(name, pat)
                                                                     for pat in t.freeze)
        p.requires_grad_(not frozen)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"train.freeze={list(t.freeze)} freezes every parameter: nothing would train")
    return model
