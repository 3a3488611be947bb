"""``loom calibrate``: the fits recover what synthetic timings were made of, a profile saved and loaded
changes the cluster the planner sees, and a real (quick) calibration on two gloo processes works."""

from __future__ import annotations

import json
import math

import pytest

from loom.config import ConfigError, load_config
from loom.planner import calibrate as cal
from loom.planner import fit as fitting
from loom.planner.cost import estimate, plan_for_batch
from loom.planner.hardware import CATALOGUE, apply_profile, parse_cluster


@pytest.mark.parametrize("kind", cal.COLLECTIVES)
def test_collective_fit_recovers_latency_and_bandwidth(kind):
    n, latency, bandwidth = 4, 150e-6, 1.2e9
    factor, steps = fitting.collective_factors(kind, 2 if kind == "send_recv" else n)
    sizes = [4, 1 << 12, 1 << 16, 1 << 20, 1 << 22]
    times = [steps * latency + factor * b / bandwidth for b in sizes]
    fit = fitting.fit_collective(kind, 2 if kind == "send_recv" else n, sizes, times)
    assert fit["latency_s"] == pytest.approx(latency, rel=1e-6)
    assert fit["bandwidth"] == pytest.approx(bandwidth, rel=1e-6)


def test_collective_fit_tolerates_noise_and_never_goes_negative():
    sizes = [4, 1 << 12, 1 << 16, 1 << 20, 1 << 22]
    noise = [1.05, 0.95, 1.1, 0.97, 1.02]
    times = [(2e-4 + b / 1e9) * e for b, e in zip(sizes, noise)]
    fit = fitting.fit_collective("send_recv", 2, sizes, times)
    assert fit["latency_s"] == pytest.approx(2e-4, rel=0.15) and fit["bandwidth"] == pytest.approx(1e9, rel=0.15)
    # timings that shrink with size (noise at small sizes) give no negative latency or bandwidth
    fit = fitting.fit_collective("all_reduce", 4, [4, 1 << 20], [3e-3, 1e-3])
    assert fit["latency_s"] >= 0 and fit["bandwidth"] > 0
    # ... and a finite bandwidth, as a profile must hold: the lower bound the largest transfer shows
    assert fit["bandwidth"] == pytest.approx(2 * 3 / 4 * (1 << 20) / 1e-3)


def test_block_fit_recovers_overhead_rate_and_half_width():
    t0, rate, n0 = 1.5e-3, 40e9, 60.0
    points = []
    for h, tokens in ((16, 8), (64, 256), (128, 512), (256, 256), (512, 128)):
        flops = 3 * cal._block_flops(h, 128, tokens)
        points.append((flops, h, t0 + flops / (rate * h / (h + n0))))
    fit = fitting.fit_block(points)
    assert fit["overhead_s"] == pytest.approx(t0, rel=1e-6)
    assert fit["rate"] == pytest.approx(rate, rel=1e-6)
    assert fit["half_width"] == pytest.approx(n0, rel=1e-6)


def _profile(tmp_path, **accelerator):
    acc = {"peak_flops": 50e9, "matmul_efficiency": 0.8, "matmul_half_width": 40.0, "intra_node_bw": 1e9,
           "intra_latency_s": 5e-4, "cores_per_node": 2, "runtime_bytes": 300 * 2**20, "precision": "fp32",
           "layer_overhead_s": 1e-3, "tp_layer_overhead_s": 2e-2, "dp_layer_overhead_s": 5e-3,
           "optimizer_tensor_s": 5e-5, "optimizer_param_s": 1e-8,
           "collectives": {"all_reduce": [5e-4, 1e9], "all_gather": [6e-4, 5e8], "reduce_scatter": [7e-4, 2e8],
                           "all_to_all": [4e-4, 7e8], "send_recv": [3e-4, 1.5e9]},
           "not_a_field": 1, **accelerator}
    path = tmp_path / "calibration.json"
    cal.save_profile({"version": cal.PROFILE_VERSION, "machine": "x86_64, 2 cores", "accelerator": acc}, path)
    return path


def test_a_saved_profile_is_what_the_planner_uses(tmp_path):
    path = _profile(tmp_path)
    assert cal.load_profile(path)["accelerator"]["peak_flops"] == 50e9
    cluster = parse_cluster("4xcpu", profile=path)
    a = cluster.accelerator
    assert cluster.nodes == 1  # the processes of one machine
    assert (a.peak_flops, a.matmul_efficiency, a.matmul_half_width, a.cores_per_node) == (50e9, 0.8, 40.0, 2)
    assert a.collective("reduce_scatter") == (2e8, 7e-4) and a.collective("nothing") is None
    assert a.runtime_bytes == 300 * 2**20 and a.precision == "fp32"
    assert CATALOGUE["cpu"].collective("all_reduce") is None  # the catalogue entry is untouched
    assert apply_profile(CATALOGUE["a100-80g"], path).peak_flops == 50e9
    with pytest.raises(ConfigError, match="does not exist"):
        parse_cluster("4xcpu", profile=tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a `loom calibrate` JSON"):
        parse_cluster("4xcpu", profile=tmp_path / "bad.json")


def test_calibrated_terms_enter_the_estimate(tmp_path):
    cfg = load_config(None, ["model=gpt-tiny", "model.n_layer=4"]).model
    plain = parse_cluster("4xcpu")
    calibrated = parse_cluster("4xcpu", profile=_profile(tmp_path))
    dp, tp = plan_for_batch(16, 4, dp=4), plan_for_batch(16, 8, dp=2, tp=2)
    e_dp, e_tp = (estimate(cfg, lay, calibrated, 16, 64) for lay in (dp, tp))
    for e in (e_dp, e_tp):
        assert sum(e.time_s.values()) == pytest.approx(e.step_time_s)
        assert e.time_s["overhead"] > 0 and e.time_s["optimizer"] > 0
        # fp32 on a CPU: 16 bytes per parameter and the runtime's own memory
        assert e.memory_gb["runtime"] == pytest.approx(300 / 1024)
    assert e_tp.time_s["overhead"] > e_dp.time_s["overhead"]  # distributed-tensor dispatch per block
    assert estimate(cfg, dp, plain, 16, 64).time_s.get("overhead", 0.0) == 0.0
    # contention: 4 processes on 2 cores take twice a lone process's time to compute
    lone = parse_cluster("4xcpu", profile=_profile(tmp_path, cores_per_node=4))
    assert e_dp.time_s["compute"] == pytest.approx(2 * estimate(cfg, dp, lone, 16, 64).time_s["compute"])
    # ... but a pipeline's ramp-up runs on free cores: its bubble costs less than on dedicated devices
    pp = plan_for_batch(16, 2, pp=4)
    assert estimate(cfg, pp, calibrated, 16, 64).time_s["pp_bubble"] \
        < estimate(cfg, pp, lone, 16, 64).time_s["pp_bubble"] * 2


def test_fp32_memory_counts_sixteen_bytes_per_parameter(tmp_path):
    cfg = load_config(None, ["model=gpt-tiny", "model.n_layer=4"]).model
    profile = _profile(tmp_path)
    one = estimate(cfg, plan_for_batch(16, 16), parse_cluster("1xcpu", profile=profile), 16, 64)
    n, gib = one.params_per_device, 2**30
    assert (one.memory_gb["weights"], one.memory_gb["grads"], one.memory_gb["optimizer"]) == pytest.approx(
        (4 * n / gib, 4 * n / gib, 8 * n / gib))
    cluster = parse_cluster("4xcpu", profile=profile)
    dp = estimate(cfg, plan_for_batch(16, 4, dp=4), cluster, 16, 64)
    # zero=0 without tp/pp/ep is DDP: one copy of the weights, gradients as views of its buckets
    assert dp.memory_gb["weights"] == pytest.approx(4 * n / gib) and dp.memory_gb["grads"] == pytest.approx(4 * n / gib)
    z1 = estimate(cfg, plan_for_batch(16, 4, dp=4, zero=1), cluster, 16, 64)
    assert z1.memory_gb["optimizer"] == pytest.approx(dp.memory_gb["optimizer"] / 4)
    assert z1.memory_gb["weights"] == pytest.approx(5 * n / gib)
    z3 = estimate(cfg, plan_for_batch(16, 4, dp=4, zero=3), cluster, 16, 64)
    assert z3.memory_gb["weights"] < z1.memory_gb["weights"] and z3.memory_gb["grads"] < z1.memory_gb["grads"]
    # activations shrink with recomputation
    full = estimate(cfg, plan_for_batch(16, 4, dp=4, recompute="full"), cluster, 16, 64)
    assert full.memory_gb["activations"] < dp.memory_gb["activations"]
    bf16 = estimate(cfg, plan_for_batch(16, 4, dp=4), cluster, 16, 64, precision="bf16")
    assert bf16.memory_gb["weights"] == pytest.approx(6 * n / gib) and "runtime" not in bf16.memory_gb


@pytest.mark.slow
def test_a_quick_calibration_on_two_processes(tmp_path):
    out = tmp_path / "calibration.json"
    profile = cal.main_calibrate(out, nproc=2, quick=True)
    a = profile["accelerator"]
    assert out.is_file() and profile["path"] == str(out)
    assert a["peak_flops"] > 1e8 and 0 < a["matmul_efficiency"] <= 1
    assert a["runtime_bytes"] > 50 * 2**20
    assert set(a["collectives"]) == set(cal.COLLECTIVES)
    for latency, bandwidth in a["collectives"].values():
        assert latency >= 0 and bandwidth > 0 and math.isfinite(latency)
    saved = json.loads(out.read_text())
    assert saved["nproc"] == 2 and saved["raw"]["collectives"]["all_reduce"]
    cluster = parse_cluster("2xcpu", profile=out)
    cfg = load_config(None, ["model=gpt-tiny"]).model
    e = estimate(cfg, plan_for_batch(16, 8, dp=2), cluster, 16, 64)
    assert e.step_time_s > 0 and e.memory_gb_per_device > a["runtime_bytes"] / 2**30
