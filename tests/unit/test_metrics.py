import json

import pytest
import torch

import loom.train.metrics as metrics


def test_cpu_peak_is_the_best_of_a_few_measurements_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOM_CACHE", str(tmp_path))
    rates = iter([2e10, 1e11, 5e10, 7e11])  # the first taken on a busy machine
    calls = []
    monkeypatch.setattr(metrics, "measure_matmul_flops",
                        lambda device, precision: calls.append(precision) or next(rates))
    got = [metrics.peak_flops(torch.device("cpu"), "fp32") for _ in range(5)]
    assert got == [2e10, 1e11, 1e11, 1e11, 1e11]  # the max of three, then no more measuring
    assert calls == ["fp32"] * 3
    assert metrics.peak_flops(torch.device("cpu"), "bf16") == 7e11
    assert len(json.loads((tmp_path / "peak_flops.json").read_text())) == 2


def test_a_rate_training_reached_raises_the_cached_peak(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOM_CACHE", str(tmp_path))
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda device, precision: 1e9)
    for _ in range(3):
        metrics.peak_flops(torch.device("cpu"), "fp32")
    metrics.raise_cpu_peak("fp32", 3e9)
    metrics.raise_cpu_peak("fp32", 2e9)  # lower: kept as it was
    assert metrics.peak_flops(torch.device("cpu"), "fp32") == 3e9


def test_a_bf16_peak_cached_from_torch_s_emulated_kernels_is_not_reused(tmp_path, monkeypatch):
    """On a CPU without bf16 instructions loom's bf16 products run as fp32 kernels: a peak an older loom
    measured there with torch's emulated kernels (~1/40 of it) would put MFU far above 100%."""
    from loom.train import precision

    monkeypatch.setenv("LOOM_CACHE", str(tmp_path))
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda device, precision: 1e9)
    monkeypatch.setattr(precision, "_cpu_runs_natively", lambda dtype: True)  # the key torch's kernels had
    for _ in range(3):
        metrics.peak_flops(torch.device("cpu"), "bf16")
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda device, precision: 4e10)
    monkeypatch.setattr(precision, "_cpu_runs_natively", lambda dtype: False)
    assert metrics.peak_flops(torch.device("cpu"), "bf16") == 4e10  # measured afresh

def test_matmul_probe_measures_a_plausible_rate():
    rate = metrics.measure_matmul_flops(torch.device("cpu"), "fp32", n=256, seconds=0.05)
    assert 1e8 < rate < 1e14


def test_probe_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    metrics.measure_matmul_flops(torch.device("cpu"), "fp32", n=64, seconds=0.01)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA A100-SXM4-80GB", 312e12)])
def test_gpu_peaks_come_from_the_datasheet_table(name, peak, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert metrics.peak_flops(torch.device("cuda"), "bf16") == peak


def test_metrics_file_truncates_records_after_a_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    f = metrics.MetricsFile(path)
    for step in (10, 20, 30):
        f.write({"step": step, "loss": float(step)})
    f.close()
    f = metrics.MetricsFile(path, truncate_after_step=20)
    f.write({"step": 30, "loss": float("nan")})
    f.close()
    assert metrics.read_metrics(path) == [{"step": 10, "loss": 10.0}, {"step": 20, "loss": 20.0},
                                          {"step": 30, "loss": None}]
