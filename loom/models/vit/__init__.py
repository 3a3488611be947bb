"""ViT (Dosovitskiy et al. 2020): a Transformer encoder over image patches, classifying on [CLS]."""

from __future__ import annotations

from loom.errors import ConfigError
from loom.models.config import ModelConfig
from loom.models.registry import register
from loom.models.spec import ModelSpec, PipelineSplit, Sharding
from loom.models.vit.hf import HF
from loom.models.vit.model import ViT, n_patches
from loom.models.vit.presets import PRESETS, PUBLISHED_PARAMS
from loom.models.vit.sharding import TABLE

PIPELINE = PipelineSplit(first=("patch_proj", "cls_emb", "pos_emb"), last=("ln_f", "cls_head"), blocks="layers")
# the patch projection reads pixels, not the residual stream
SHARDING = Sharding(table=TABLE, positional=("pos_emb",), whole_inputs=("patch_proj",))


def validate(cfg: ModelConfig) -> None:
    if cfg.patch_size < 1 or cfg.image_size < cfg.patch_size or cfg.image_size % cfg.patch_size:
        raise ConfigError(f"model.image_size={cfg.image_size} must be a positive multiple of "
                          f"model.patch_size={cfg.patch_size}")
    tokens = n_patches(cfg) + 1  # the sequence the blocks read: the patches and [CLS]
    if cfg.block_size != tokens:
        raise ConfigError(f"model.block_size={cfg.block_size}, but a ViT's sequence is {tokens} tokens "
                          f"({n_patches(cfg)} patches of {cfg.image_size}x{cfg.image_size} images in "
                          f"{cfg.patch_size}x{cfg.patch_size} patches, and [CLS]); set model.block_size={tokens}")
    if cfg.moe.experts:
        raise ConfigError(f"model.moe.experts={cfg.moe.experts}: ViT's blocks have no Mixture-of-Experts layers "
                          "(GPT, PanGu-α and BERT do); set model.moe.experts=0")
    if cfg.n_classes < 0 or cfg.n_classes == 1:
        raise ConfigError(f"model.n_classes={cfg.n_classes}: a ViT classifies into 2 or more classes "
                          "(0: as many as the data's labels)")


# Sequence parallelism would split [CLS] + patches (17 for vit-tiny, 197 for vit-b-16: rarely a multiple
# of tp) over the ranks, the [CLS] row and the patch rows coming from different modules; not built.
NO_SP = ("its sequence ([CLS] + image patches, e.g. 197 for 224x224 images in 16x16 patches) is built from "
         "two modules and is rarely a multiple of tp")

# model.block_size is the sequence the cost description counts: patches + [CLS], as validate checks
# (a stated length, not a derived one, so that what describe and the planner count is what the config says)
SPEC = register(ModelSpec(name="vit", build=ViT, presets=PRESETS, published_params=PUBLISHED_PARAMS,
                          sharding=SHARDING, pipeline=PIPELINE, tasks=("image_classification",), validate=validate,
                          hf=HF, no_sequence_parallel=NO_SP, class_heads=("cls_head",)))

__all__ = ["PIPELINE", "SHARDING", "SPEC", "ViT"]
