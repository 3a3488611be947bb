"""Communication time: collectives over groups inside a node (intra-node links) or across nodes,
ring algorithms (an all-reduce moves 2(n−1)/n of the buffer, an all-gather, reduce-scatter or
all-to-all (n−1)/n), and the data-parallel gradient reduction (with ZeRO's gathers)."""

from __future__ import annotations

from loom.parallel.plan import Plan
from loom.planner.hardware import Cluster

DP_OVERLAP = 0.4  # share of the backward that hides the data-parallel gradient reduction


def bandwidth(cluster: Cluster, group: int, stride: int) -> tuple[float, float]:
    """(bytes/s, latency) of a group of ``group`` ranks ``stride`` apart in rank order: inside one node
    when it fits there."""
    a = cluster.accelerator
    if group * stride <= a.devices_per_node:
        return a.intra_node_bw, a.intra_latency_s
    return a.inter_node_bw, a.inter_latency_s


def link(cluster: Cluster, kind: str, group: int, stride: int) -> tuple[float, float]:
    """(bytes/s, latency) of collective ``kind`` over ``group`` ranks ``stride`` apart: the figures
    ``loom calibrate`` measured for that kind when the group is inside a node and it measured them."""
    if group * stride <= cluster.accelerator.devices_per_node:
        measured = cluster.accelerator.collective(kind)
        if measured is not None:
            return measured
    return bandwidth(cluster, group, stride)


def all_reduce_s(nbytes: float, n: int, bw: float, lat: float) -> float:
    return 0.0 if n <= 1 else 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * lat


def all_gather_s(nbytes: float, n: int, bw: float, lat: float) -> float:
    """Also reduce-scatter and all-to-all: each rank moves (n-1)/n of the buffer."""
    return 0.0 if n <= 1 else (n - 1) / n * nbytes / bw + (n - 1) * lat


def data_parallel_s(cluster: Cluster, L: Plan, dense: float, experts: float, m: int, fp32: bool,
                     buckets: int, backward: float) -> float:
    """The gradient reduction over the replicas (and ZeRO's parameter gathers), less what the backward
    hides. One collective per block (``buckets``): the latency counts that often."""
    replicas = L.dp * L.ep
    if replicas <= 1:
        return 0.0
    param_bytes = 4 if fp32 else 2  # what FSDP gathers: the working copy
    grad_bytes = 4
    dp_ar = link(cluster, "all_reduce", replicas, L.tp)
    ex_ar = link(cluster, "all_reduce", L.dp, L.tp * L.ep)

    def lat(link):  # the latency of `buckets` collectives
        return link[0], link[1] * buckets

    if L.zero == 0:
        comm = all_reduce_s(dense * grad_bytes, replicas, *lat(dp_ar))
        if experts:
            comm += all_reduce_s(experts * grad_bytes, L.dp, *lat(ex_ar))
    else:
        rs = link(cluster, "reduce_scatter", replicas, L.tp)
        ag = link(cluster, "all_gather", replicas, L.tp)
        ex_rs = link(cluster, "reduce_scatter", L.dp, L.tp * L.ep)
        ex_ag = link(cluster, "all_gather", L.dp, L.tp * L.ep)
        reductions = m if L.zero >= 2 and L.pp == 1 else 1  # ZeRO-2/3 reduce every accumulation micro-step
        gathers = 2 * m if L.zero == 3 else 1  # ZeRO-3: for each micro-batch's forward and backward
        comm = reductions * all_gather_s(dense * grad_bytes, replicas, *lat(rs))
        comm += gathers * all_gather_s(dense * param_bytes, replicas, *lat(ag))
        if experts:
            comm += reductions * all_gather_s(experts * grad_bytes, L.dp, *lat(ex_rs))
            comm += gathers * all_gather_s(experts * param_bytes, L.dp, *lat(ex_ag))
    return max(0.0, comm - DP_OVERLAP * backward) if not cluster.accelerator.cores_per_node else comm
