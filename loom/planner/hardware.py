"""Clusters: what one accelerator can do and how the devices are connected.

A cluster is ``nodes × devices_per_node`` accelerators of one kind. Bandwidths are per device and
one direction, in bytes/s, as the collectives see them (bus bandwidth, NCCL's ``busbw``): inside a
node over NVLink/NVSwitch (or HCCS), across nodes over the network (a node's NICs shared by its
devices). Peak FLOP/s are the vendor's dense bf16/fp16 figures. ``--cluster 128xa100-80g`` names a
catalogue entry and a device count; a YAML file describes anything else::

    accelerator: h100-sxm        # a catalogue entry to start from (optional)
    devices: 64
    devices_per_node: 8
    peak_tflops: 989             # any field of Accelerator may be overridden
    inter_node_gbps: 400         # network bandwidth per device, Gb/s
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from loom.config import ConfigError

GB = 1e9


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_flops: float  # dense bf16/fp16 FLOP/s
    memory_bytes: float
    intra_node_bw: float  # bytes/s per device, one direction (collective bus bandwidth)
    inter_node_bw: float  # bytes/s per device across nodes
    devices_per_node: int
    intra_latency_s: float = 5e-6
    inter_latency_s: float = 1e-5
    matmul_efficiency: float | None = None  # measured by ``loom calibrate``: achieved / peak on large matmuls
    # --- what ``loom calibrate`` measures besides (the defaults leave a catalogue accelerator as it was) ---
    # the achieved rate's width dependence: peak · matmul_efficiency · h / (h + matmul_half_width)
    matmul_half_width: float | None = None
    # per collective kind (all_reduce, all_gather, reduce_scatter, all_to_all, send_recv): (latency s, bus bytes/s)
    # inside a node; kinds not named use intra_latency_s / intra_node_bw
    collectives: tuple[tuple[str, float, float], ...] = ()
    cores_per_node: int | None = None  # CPU cores the devices of a node share (None: each device is its own)
    # fixed costs (seconds of one process's time, for a process that has a core to itself): Python,
    # autograd and kernel launches, which dominate a tiny model on a CPU
    layer_overhead_s: float = 0.0  # per block and micro-batch, forward + backward
    selective_overhead_s: float = 0.0  # per block and micro-batch, extra under selective recomputation
    full_overhead_s: float = 0.0  # per block and micro-batch, extra under full recomputation
    microbatch_overhead_s: float = 0.0  # per micro-batch: embedding, head, loss
    tp_layer_overhead_s: float = 0.0  # per block and micro-batch, extra under tensor parallelism
    dp_layer_overhead_s: float = 0.0  # per block and micro-batch, extra under data parallelism (FSDP's hooks)
    dp_sync_layer_overhead_s: float = 0.0  # per block and gradient synchronization (FSDP's reduction)
    sp_layer_overhead_s: float = 0.0  # per block and micro-batch, extra under sequence parallelism
    optimizer_tensor_s: float = 0.0  # per parameter tensor and step: optimizer step and gradient clipping
    dtensor_tensor_s: float = 0.0  # extra per parameter tensor and step when parameters are distributed tensors
    optimizer_param_s: float = 0.0  # per parameter (of this device's shard) and step
    runtime_bytes: float = 0.0  # memory of a process before any model: the framework's own (a CPU's resident set)
    tp_runtime_bytes: float = 0.0  # ... more of it under tensor parallelism (distributed tensors' machinery)
    precision: str = "bf16"  # what the planner assumes a model trains in here: bf16 mixed precision | fp32

    def collective(self, kind: str) -> tuple[float, float] | None:
        """(bus bandwidth, latency) measured for ``kind`` inside a node, or None."""
        for name, latency, bandwidth in self.collectives:
            if name == kind:
                return bandwidth, latency
        return None


CATALOGUE: dict[str, Accelerator] = {
    # NVIDIA: A100 SXM (NVLink3 600 GB/s bidirectional; HDR InfiniBand 8×200 Gb/s per DGX node)
    "a100-40g": Accelerator("A100 SXM 40GB", 312e12, 40 * 2**30, 240 * GB, 25 * GB, 8),
    "a100-80g": Accelerator("A100 SXM 80GB", 312e12, 80 * 2**30, 240 * GB, 25 * GB, 8),
    # H100 SXM (NVLink4 900 GB/s bidirectional; NDR 8×400 Gb/s), H200 (same links, 141 GB HBM3e)
    "h100-sxm": Accelerator("H100 SXM 80GB", 989e12, 80 * 2**30, 360 * GB, 50 * GB, 8),
    "h200": Accelerator("H200 SXM 141GB", 989e12, 141 * GB, 360 * GB, 50 * GB, 8),
    # Huawei Ascend 910 (PanGu-α): 256 TFLOP/s fp16, 32 GB HBM, 8 per server (HCCS inside, 100 GbE RoCE across)
    "ascend910": Accelerator("Ascend 910 32GB", 256e12, 32 * 2**30, 90 * GB, 12.5 * GB, 8),
    # this machine's CPU: a placeholder until `loom calibrate` measures it. A device is one gloo process
    # (fp32); the processes of a job started by `loom train --nproc N` all run on this one machine
    "cpu": Accelerator("CPU (gloo)", 100e9, 8 * 2**30, 2 * GB, 2 * GB, 64, 50e-6, 50e-6, precision="fp32"),
}


@dataclass(frozen=True)
class Cluster:
    accelerator: Accelerator
    devices: int

    @property
    def devices_per_node(self) -> int:
        return self.accelerator.devices_per_node

    @property
    def nodes(self) -> int:
        return -(-self.devices // self.devices_per_node)

    def describe(self) -> str:
        a = self.accelerator
        return (f"{self.devices} × {a.name} ({self.nodes} nodes of {a.devices_per_node}; {a.peak_flops / 1e12:g} "
                f"TFLOP/s, {a.memory_bytes / 2**30:.0f} GiB, {a.intra_node_bw / GB:g} GB/s in a node, "
                f"{a.inter_node_bw / GB:g} GB/s across)")


def parse_cluster(spec: str, profile: str | Path | None = None) -> Cluster:
    """``NxNAME`` (e.g. ``128xa100-80g``) or a YAML file; ``profile``: a ``loom calibrate`` JSON whose
    measured figures replace the catalogue's."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml", ".json") or path.is_file():
        cluster = _from_file(path)
    else:
        m = re.fullmatch(r"(\d+)\s*[x×]\s*([\w.-]+)", spec.strip().lower())
        if not m:
            raise ConfigError(f"--cluster {spec!r}: write DEVICESxNAME (e.g. 128xa100-80g; names: "
                              f"{', '.join(CATALOGUE)}) or a YAML file")
        n, name = int(m.group(1)), m.group(2)
        if name not in CATALOGUE:
            raise ConfigError(f"--cluster {spec!r}: unknown accelerator {name!r}; known: {', '.join(CATALOGUE)}, "
                              "or describe it in a YAML file")
        if n < 1:
            raise ConfigError(f"--cluster {spec!r}: needs at least one device")
        cluster = Cluster(CATALOGUE[name], n)
    if profile is not None:
        cluster = dataclasses.replace(cluster, accelerator=apply_profile(cluster.accelerator, profile))
    return cluster


def _from_file(path: Path) -> Cluster:
    from omegaconf import OmegaConf

    if not path.is_file():
        raise ConfigError(f"--cluster {str(path)!r}: no such file")
    d = dict(OmegaConf.to_container(OmegaConf.load(path)))
    base = CATALOGUE.get(str(d.pop("accelerator", "")).lower())
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(Accelerator)} if base else {}
    conv = {"peak_tflops": ("peak_flops", 1e12), "memory_gb": ("memory_bytes", 2**30),
            "intra_node_gbps": ("intra_node_bw", GB / 8), "inter_node_gbps": ("inter_node_bw", GB / 8),
            "intra_node_gb_s": ("intra_node_bw", GB), "inter_node_gb_s": ("inter_node_bw", GB)}
    devices = d.pop("devices", None)
    for key, value in d.items():
        if key in conv:
            name, unit = conv[key]
            fields[name] = _number(value, f"{path}: {key}") * unit
            if not fields[name] > 0:
                raise ConfigError(f"{path}: {key}={value!r} must be > 0")
        elif key in {f.name for f in dataclasses.fields(Accelerator)}:
            fields[key] = value
        else:
            raise ConfigError(f"{path}: unknown key {key!r}; valid: devices, accelerator, {', '.join(conv)}, "
                              f"{', '.join(f.name for f in dataclasses.fields(Accelerator))}")
    fields.setdefault("name", path.stem)
    _tuple_collectives(fields)
    missing = [f.name for f in dataclasses.fields(Accelerator)
               if f.name not in fields and f.default is dataclasses.MISSING]
    if missing or devices is None:
        raise ConfigError(f"{path}: missing {', '.join(missing + (['devices'] if devices is None else []))} "
                          "(or name a catalogue accelerator to start from)")
    n = _number(devices, f"{path}: devices")
    if n != int(n) or n < 1:
        raise ConfigError(f"{path}: devices={devices!r} must be a whole number >= 1")
    return Cluster(check_accelerator(Accelerator(**fields), str(path)), int(n))


# what must be > 0 (a zero bandwidth or peak divides by zero; a negative one ranks layouts wrongly)
_POSITIVE = ("peak_flops", "memory_bytes", "intra_node_bw", "inter_node_bw", "devices_per_node")


def check_accelerator(acc: Accelerator, where: str) -> Accelerator:
    """Raise :class:`ConfigError` unless every figure of ``acc`` is a finite number in its range:
    peak, memory, bandwidths and devices per node > 0, latencies, efficiencies and overheads >= 0."""
    for f in dataclasses.fields(Accelerator):
        value = getattr(acc, f.name)
        if f.name in ("name", "precision", "collectives") or value is None:
            continue
        v = _number(value, f"{where}: {f.name}")
        if f.name in _POSITIVE and not v > 0:
            raise ConfigError(f"{where}: {f.name}={value!r} must be > 0")
        if not v >= 0:
            raise ConfigError(f"{where}: {f.name}={value!r} must be >= 0")
    if acc.devices_per_node != int(acc.devices_per_node):
        raise ConfigError(f"{where}: devices_per_node={acc.devices_per_node!r} must be a whole number")
    for kind, latency, bandwidth in acc.collectives:
        if not (_number(latency, f"{where}: collectives.{kind}") >= 0
                and _number(bandwidth, f"{where}: collectives.{kind}") > 0):
            raise ConfigError(f"{where}: collectives.{kind}=[{latency}, {bandwidth}] needs latency >= 0 "
                              "and bandwidth > 0")
    if acc.precision not in ("bf16", "fp32"):
        raise ConfigError(f"{where}: precision={acc.precision!r}; choose bf16 or fp32")
    return acc


def _number(value, key: str) -> float:
    """``value`` as a finite float, or a :class:`ConfigError` naming ``key``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a number") from None
    if isinstance(value, bool) or v != v or v in (float("inf"), float("-inf")):
        raise ConfigError(f"{key}={value!r} must be a finite number")
    return v


def apply_profile(acc: Accelerator, profile: str | Path) -> Accelerator:
    """The accelerator with the figures a ``loom calibrate`` profile measured."""
    p = Path(profile)
    if not p.is_file():
        raise ConfigError(f"calibration profile {str(p)!r} does not exist; make it with `loom calibrate`")
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"calibration profile {str(p)!r} is not a `loom calibrate` JSON file: {e}") from None
    keep = {f.name for f in dataclasses.fields(Accelerator)}
    fields = {k: v for k, v in d.get("accelerator", {}).items() if k in keep}
    _tuple_collectives(fields)
    if "name" not in fields and d.get("machine"):
        fields["name"] = f"{acc.name}, calibrated: {d['machine']}"
    return check_accelerator(dataclasses.replace(acc, **fields), str(p))


def _tuple_collectives(fields: dict) -> None:
    """``collectives`` as a file writes it, ``{kind: [latency_s, bandwidth]}``, as the field holds it."""
    if isinstance(fields.get("collectives"), dict):
        try:
            fields["collectives"] = tuple((str(k), float(v[0]), float(v[1])) for k, v in fields["collectives"].items())
        except (TypeError, ValueError, IndexError, KeyError):
            raise ConfigError(f"collectives={fields['collectives']!r}: write {{kind: [latency_s, bytes_per_s]}}") \
                from None
