"""``train.init_from=RUN_DIR``: start a run from another run's weights (fine-tuning).

Only the model's weights come over, not the optimizer's state, the step or the random state: the
new run starts at step 0 with fresh moments. Weights are matched by name and shape: those of the
other run's newest checkpoint that this model also has are loaded (under any layout: DCP reads
each shard by its global offsets), those this model lacks are dropped (the heads the new task does
not use: a pretraining run's masked-LM and next-sentence heads), and this model's own that the
checkpoint lacks keep their fresh initialization (a new classifier). A classifier whose class count
differs from the other run's (the family's ``class_heads``: a ViT trained on the digits fine-tuned on a
folder of two classes) is initialized afresh too; any other weight of another shape is an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from loom.errors import ConfigError
from loom.train.checkpoint import _single_process_is_intended, latest_checkpoint

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
