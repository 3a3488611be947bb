"""What each rank reads of a Hugging Face checkpoint when a run starts from it (``train.init_from``).

    python benchmarks/hf_shard_reads.py            # tiny random GPT-2 and Llama (4 blocks), tp2 and pp2

Saves a random ``transformers`` GPT-2 and Llama (needs the ``test`` extra) and starts the trainer from
each on one process and under tp2 and pp2 (2 gloo processes), counting the tensor elements every
rank's ``HuggingFaceStorageReader`` reads from the safetensors file. One process reads every stored
element the model uses once; a rank of a 2-way layout should read about half. Prints a table and
writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYOUTS = ("tp2", "pp2")


def main() -> None:
    from loom.parallel.launch import Process
    from tests.distributed.harness import run_on_ranks
    from tests.distributed.hf_parity import LAYOUTS as SETTINGS
    from tests.distributed.hf_parity import _train, train_cases
    from tests.hf_models import gpt2_dir, llama_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="hf_shard_reads.json")
    args = parser.parse_args()
    root, paths = Path(tempfile.mkdtemp()), {}
    for name, save in (("gpt2", gpt2_dir), ("llama", llama_dir)):
        (root / name).mkdir()
        save(root / name, ["def f(x):\n    return x\n"] * 30, n_layer=4)
        paths[name] = str(root / name)
    results = run_on_ranks(2, train_cases, paths, [(m, SETTINGS[lay]) for m in paths for lay in LAYOUTS])
    rows = []
    for model, path in paths.items():
        whole = _train(path, [], Process())["elements_read"]
        for lay in LAYOUTS:
            per_rank = [r[(model, *SETTINGS[lay])]["elements_read"] for r in results]
            rows.append({"model": model, "layout": lay, "one_process": whole, "per_rank": per_rank,
                         "fraction": [round(p / whole, 3) for p in per_rank]})
    print(f"{'model':6s} {'layout':6s} {'one process':>12s} {'rank 0':>8s} {'rank 1':>8s}  fraction")
    for r in rows:
        print(f"{r['model']:6s} {r['layout']:6s} {r['one_process']:>12,d} {r['per_rank'][0]:>8,d} "
              f"{r['per_rank'][1]:>8,d}  {r['fraction']}")
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
