"""No silent wrong numbers: bad cluster figures and plan arguments are one line (exit 2), MFU is never
above 100% whatever the cached CPU peak says, bytes that are not UTF-8 are counted and reported, and
a huge one-line file is read in bounded memory."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from loom.data.corpus import MAX_DOCUMENT_CHARS, iter_documents
from loom.train.metrics import read_metrics


@pytest.mark.parametrize("body, fragment", [
    ("accelerator: a100-80g\ndevices: 16\ninter_node_gbps: -100\n", "inter_node_gbps=-100 must be > 0"),
    ("accelerator: a100-80g\ndevices: 16\ninter_node_gbps: 0\n", "inter_node_gbps=0 must be > 0"),
    ("accelerator: a100-80g\ndevices: 16\nintra_node_bw: 0\n", "intra_node_bw=0 must be > 0"),
    ("accelerator: a100-80g\ndevices: 16\npeak_tflops: lots\n", "peak_tflops='lots' is not a number"),
    ("accelerator: a100-80g\ndevices: 16\npeak_tflops: .nan\n", "must be a finite number"),
    ("accelerator: a100-80g\ndevices: 0\n", "devices=0 must be a whole number >= 1"),
    ("accelerator: a100-80g\ndevices: 16\ninter_latency_s: -1\n", "inter_latency_s=-1 must be >= 0"),
])
def test_a_cluster_file_with_bad_numbers_is_one_line(body, fragment, tmp_path, loom_cli):
    (tmp_path / "cluster.yaml").write_text(body)
    code, out, err = loom_cli("plan", "gpt-tiny", "--cluster", str(tmp_path / "cluster.yaml"), "--global-batch", "8")
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("loom: error:") and fragment in err, err


@pytest.mark.parametrize("args, fragment", [
    (["--seq", "-5"], "--seq -5 must be at least 1"),
    (["--seq", "0"], "--seq 0 must be at least 1"),
    (["--top", "0"], "--top 0 must be at least 1"),
])
def test_plan_arguments_out_of_range_are_one_line(args, fragment, loom_cli):
    code, out, err = loom_cli("plan", "gpt-tiny", "--cluster", "8xa100-80g", "--global-batch", "8", *args)
    assert code == 2 and out == "" and err.startswith("loom: error:") and fragment in err, err


def test_mfu_never_exceeds_100_percent_when_the_cached_peak_was_measured_on_a_busy_machine(
        tiny_config, tmp_path, monkeypatch):
    import loom.train.metrics as metrics
    from tests.helpers import train

    monkeypatch.setenv("LOOM_CACHE", str(tmp_path / "cache"))
    path, key = metrics._peak_cache("fp32")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({key: [1e6, metrics.CPU_PEAK_MEASUREMENTS]}))  # far below any real CPU
    run = tmp_path / "run"
    train(tiny_config("train.steps=3", "train.eval_every=100", run_dir=run), run)
    mfus = [r["mfu"] for r in read_metrics(run / "metrics.jsonl") if "mfu" in r]
    assert mfus and all(0 < m <= 1 for m in mfus), mfus
    assert metrics._read_peaks(path)[key][0] > 1e6  # the cache learned the rate the training reached


def test_bytes_that_are_not_utf8_are_counted_and_reported(tiny_config, tmp_path, caplog):
    from loom.data import prepare_data

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text("plain text that decodes\n" * 200)
    (corpus / "bad.txt").write_bytes(b"caf\xe9 latin-1 here \xff\xfe and more\n" * 100)
    replaced = {}
    docs = list(iter_documents(sorted(corpus.iterdir()), replaced=replaced))
    assert replaced == {str(corpus / "bad.txt"): 300}
    assert docs[0].count("\ufffd") == 300
    with caplog.at_level("WARNING", logger="loom"):
        data = prepare_data(str(corpus), 300, cache_dir=str(tmp_path / "cache"))
    assert data.meta["replaced_bytes"] == 300
    assert "300 bytes that are not UTF-8" in caplog.text and "bad.txt" in caplog.text


def test_a_huge_one_line_file_is_read_in_bounded_memory(tmp_path):
    f = tmp_path / "one_line.txt"
    with f.open("w") as fh:  # one line of 24 Mi characters
        piece = "word " * (MAX_DOCUMENT_CHARS // 5 // 8)
        for _ in range(24 * 8):
            fh.write(piece)
    size = f.stat().st_size
    tracemalloc.start()
    try:
        n, total = 0, 0
        for doc in iter_documents([f]):
            assert len(doc) <= MAX_DOCUMENT_CHARS
            n, total = n + 1, total + len(doc)
            del doc
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == size and n == -(-size // MAX_DOCUMENT_CHARS)
    assert peak < 6 * MAX_DOCUMENT_CHARS, f"{peak / 2**20:.0f} MiB held for a {size / 2**20:.0f} MiB line"
