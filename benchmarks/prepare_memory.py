"""Peak memory of data preparation on a one-line file: does it grow with the file?

    PYTHONPATH=. python3 benchmarks/prepare_memory.py --mb 10 40 [--out prepare_memory.json]

For each size: writes a file of that many MB of random words with no newline, prepares it
(``loom.data.prepare_data``: a BPE tokenizer trained on it, the tokens encoded) in a fresh process,
and prints that process's peak resident set. Before streaming, a 200 MB one-line file reached 18 GB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import random, resource, sys, time
from pathlib import Path
root, size_mb = Path(sys.argv[1]), int(sys.argv[2])
rng = random.Random(0)
words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8))) for _ in range(5000)]
f = root / "one_line.txt"
with f.open("w") as fh:
    written = 0
    while written < size_mb << 20:
        chunk = " ".join(rng.choice(words) for _ in range(100_000)) + " "
        fh.write(chunk)
        written += len(chunk)
from loom.data import prepare_data
t = time.perf_counter()
d = prepare_data(str(f), 512, cache_dir=str(root / "cache"))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, d.meta["n_documents"], time.perf_counter() - t)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, nargs="+", default=[10, 40])
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    print(f"{'file MB':>8} {'peak RSS MB':>12} {'documents':>10} {'seconds':>8}")
    for mb in args.mb:
        with tempfile.TemporaryDirectory() as root:
            out = subprocess.run([sys.executable, "-c", CHILD, root, str(mb)], capture_output=True, text=True,
                                 check=True).stdout.split()
        rss, docs, secs = float(out[0]), int(out[1]), float(out[2])
        rows.append({"file_mb": mb, "peak_rss_mb": rss, "documents": docs, "seconds": secs})
        print(f"{mb:>8} {rss:>12.0f} {docs:>10} {secs:>8.1f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
