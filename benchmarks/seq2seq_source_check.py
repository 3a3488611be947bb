"""Does a seq2seq run read its source? Its held-out loss (no label smoothing) with each pair's own source
and with another pair's (the sources rolled by one row): equal when the model ignores the source.

    python benchmarks/seq2seq_source_check.py RUN_DIR     # prints one JSON line
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from loom.config import task_name
from loom.infer.load import load_for_inference
from loom.tasks import build_task
from loom.train.rundir import prepare_run_data

run = Path(sys.argv[1])
cfg, model, tok, step = load_for_inference(run, "cpu")
data = prepare_run_data(cfg, run / "tokenizer")
task = build_task(task_name(cfg), data, cfg.model.block_size, cfg.train.batch_size, cfg.train.seed)
src, mask, tgt_in, labels = (torch.from_numpy(np.ascontiguousarray(a)) for a in task.val)
out = {}
with torch.no_grad():
    for name, (s, m) in {"own": (src, mask), "other": (src.roll(1, 0), mask.roll(1, 0))}.items():
        logits = model(s, m, tgt_in)
        out[name] = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100).item()
print(json.dumps({"step": step, "pairs": len(src), "val_loss_own_source": round(out["own"], 4),
       "val_loss_other_source": round(out["other"], 4)}))
