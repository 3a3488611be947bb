"""``loom plan``: search (or evaluate) layouts of a model on a cluster and print them ranked; and the
bridge from a saved plan to ``loom train --plan``."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from loom.config import ConfigError
from loom.planner.cost import Estimate, Layout, estimate, layout_model
from loom.planner.hardware import Cluster, parse_cluster
from loom.planner.search import check_layout, fixed_layout, search

TERMS = ("compute", "recompute", "tp", "pp_bubble", "pp_p2p", "dp", "ep")


def add_arguments(p) -> None:
    p.add_argument("model", help="a preset name (loom describe --list)")
    p.add_argument("overrides", nargs="*", help="model.key=value settings")
    p.add_argument("--cluster", required=True, help="DEVICESxNAME (e.g. 128xa100-80g, 2048xascend910, 4xcpu) "
                                                    "or a YAML file describing the accelerator")
    p.add_argument("--global-batch", type=int, required=True, metavar="B", help="sequences per optimizer step")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's block_size)")
    p.add_argument("--fix", metavar="K=V,...", help="evaluate this layout instead of searching, e.g. "
                                                    "tp=8,pp=16,dp=16,zero=1,recompute=full,mb=1,schedule=interleaved,v=2")
    p.add_argument("--top", type=int, default=10, help="plans to print (default 10)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--profile", help="a `loom calibrate` profile whose measured figures the cluster uses")
    p.add_argument("--out", help="write the best (or fixed) plan here, for `loom train --plan FILE`")
    p.add_argument("--png", help="draw the best (or fixed) plan: memory per stage and the schedule's timeline")
    p.add_argument("--verify", action="store_true", help="dry run: build the model on the meta device with a fake "
                                                          "process group of the full world size and check the "
                                                          "parameters each rank holds against the cost model")


def cmd_plan(args) -> int:
    from loom.config import load_config

    if any(not o.startswith("model.") for o in args.overrides):
        raise ConfigError(f"plan takes model.key=value settings only, not {args.overrides}")
    cfg = load_config(None, [f"model={args.model}", *args.overrides]).model
    seq = args.seq or cfg.block_size
    if seq > cfg.block_size:
        raise ConfigError(f"--seq {seq} exceeds model.block_size={cfg.block_size}")
    if args.global_batch < 1:
        raise ConfigError(f"--global-batch {args.global_batch} must be at least 1")
    cluster = parse_cluster(args.cluster, args.profile)
    if args.fix:
        layout = fixed_layout(cfg, args.fix)
        check_layout(cfg, layout, cluster, args.global_batch)
        results = [estimate(cfg, layout, cluster, args.global_batch, seq)]
    else:
        results = search(cfg, cluster, args.global_batch, seq)
        if not results[0].fits:
            raise ConfigError(f"no layout of model={cfg.preset} fits {cluster.describe()} with batches of "
                              f"{args.global_batch} × {seq} tokens; add devices or use larger ones")
    shown = results[: max(1, args.top)]
    best = shown[0]
    if args.json:
        print(json.dumps([_record(e) for e in shown], indent=2))
    else:
        print(f"model={cfg.preset}  cluster: {cluster.describe()}  batch {args.global_batch} × {seq} tokens")
        if not args.fix:
            print(f"{len(results)} layouts costed, {sum(e.fits for e in results)} fit in memory; fastest first:")
        print(table(shown))
    if args.out:
        Path(args.out).write_text(json.dumps({**_record(best), "model": cfg.preset, "cluster": args.cluster,
                                              "global_batch": args.global_batch, "seq": seq}, indent=2) + "\n")
        if not args.json:
            print(f"plan written to {args.out}; train with: loom train model={cfg.preset} "
                  f"{' '.join(args.overrides)} --plan {args.out}".replace("  ", " "))
    if args.png:
        from loom.planner.report import plot_plan

        title = f"{cfg.preset} on {args.cluster}: {best.layout.describe()}"
        out = plot_plan(best, cluster, Path(args.png), title=title)
        if not args.json:
            print(f"picture: {out}")
    if args.verify:
        return _verify(cfg, best, cluster, args.json)
    return 0


def _verify(cfg, best: Estimate, cluster: Cluster, quiet: bool) -> int:
    from loom.planner.verify import verify

    rows = verify(cfg, best.layout)
    ok = all(abs(r["relative_difference"]) < 1e-9 for r in rows)
    if not quiet:
        for r in rows:
            print(f"verify rank {r['rank']} (stage {r['stage']}): {r['params_counted']:,} parameters held, "
                  f"{r['params_predicted']:,} predicted ({r['seconds']:.1f} s)")
        print("verify: " + ("every checked rank holds what the cost model assumed" if ok else "MISMATCH"))
    return 0 if ok else 1


def _record(e: Estimate) -> dict:
    return {"plan": asdict(e.layout), "step_time_s": e.step_time_s, "tflops_per_device": e.tflops_per_device,
            "mfu": e.mfu, "memory_gb_per_device": e.memory_gb_per_device, "fits": e.fits,
            "microbatches": e.microbatches, "time_s": e.time_s, "memory_gb": e.memory_gb,
            "memory_per_stage_gb": e.memory_per_stage_gb}


def table(estimates: list[Estimate]) -> str:
    head = ["#", "layout", "step s", "TFLOP/s/dev", "MFU", "GiB/dev", "fits"] + [t.replace("pp_", "") for t in TERMS]
    rows = [[str(i + 1), e.layout.describe(), f"{e.step_time_s:.3g}", f"{e.tflops_per_device:.1f}",
             f"{100 * e.mfu:.1f}%", f"{e.memory_gb_per_device:.1f}", "yes" if e.fits else "NO"]
            + [f"{e.time_s[t]:.3g}" for t in TERMS] for i, e in enumerate(estimates)]
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]

    def fmt(r: list[str]) -> str:
        return "  ".join(v.ljust(w) if c == 1 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths)))

    return "\n".join([fmt(head), *map(fmt, rows)])


# --------------------------------------------------------------------------------------------
# loom train --plan FILE
# --------------------------------------------------------------------------------------------


def plan_overrides(path: str | Path) -> tuple[list[str], int]:
    """The ``parallel.*``/``train.*`` settings of a plan written by ``loom plan --out``, and its
    number of processes."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--plan {str(p)!r} does not exist; write one with `loom plan ... --out FILE`")
    try:
        d = json.loads(p.read_text())
        layout = Layout(**d["plan"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--plan {str(p)!r} is not a plan written by `loom plan --out` ({e})") from None
    return layout_overrides(layout, d.get("global_batch")), layout.world_size


def layout_settings(layout: Layout, global_batch: int | None) -> dict[str, object]:
    """The config settings (``section.key`` -> value) that train with ``layout`` and ``global_batch``."""
    keys = ("dp", "tp", "pp", "ep", "zero", "recompute", "sp")
    out: dict[str, object] = {f"parallel.{k}": getattr(layout, k) for k in keys}
    if layout.vocab_size:  # the vocabulary padded for tp
        out["model.vocab_size"] = layout.vocab_size
    if layout.pp > 1:
        out.update({"parallel.schedule": layout.schedule, "parallel.virtual_stages": layout.virtual_stages})
    if global_batch:
        per_replica = global_batch // (layout.dp * layout.ep)
        steps = max(1, per_replica // layout.micro_batch)
        out["train.batch_size"] = global_batch
        out["parallel.microbatches" if layout.pp > 1 else "train.grad_accum"] = steps
    return out


def layout_overrides(layout: Layout, global_batch: int | None) -> list[str]:
    """:func:`layout_settings` as ``key=value`` overrides."""
    settings = layout_settings(layout, global_batch)
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items()]


# --------------------------------------------------------------------------------------------
# parallel.auto=true
# --------------------------------------------------------------------------------------------


def cmd_calibrate(args) -> int:
    from loom.planner.calibrate import calibrate, default_profile_path, save_profile, summary

    if args.nproc < 2 or args.nproc % 2:
        raise ConfigError(f"--nproc {args.nproc}: calibration needs an even number of processes, at least 2")
    profile = calibrate(args.nproc, quick=args.quick)
    out = save_profile(profile, args.out or default_profile_path())
    print(summary(profile))
    print(f"profile written to {out}; `loom plan ... --cluster {args.nproc}xcpu --profile {out}` uses it "
          "(parallel.auto=true finds it there by itself)")
    return 0


def local_cluster(world: int, device_type: str, profile: str | Path | None = None) -> Cluster:
    """The machine this job runs on, as the planner sees it: ``world`` GPUs of the catalogue kind
    whose name matches the device's, or ``world`` CPU processes."""
    kind = "cpu"
    if device_type == "cuda":
        import torch

        name = torch.cuda.get_device_name().lower()
        big = torch.cuda.get_device_properties(0).total_memory > 60 * 2**30
        kind = ("h200" if "h200" in name else "h100-sxm" if "h100" in name
                else ("a100-80g" if big else "a100-40g") if "a100" in name else "a100-80g")
    from loom.planner.calibrate import default_profile_path

    if profile is None and kind == "cpu" and default_profile_path().is_file():
        profile = default_profile_path()
    return parse_cluster(f"{world}x{kind}", profile)


def auto_config(cfg, world: int, device_type: str):
    """``cfg`` with its parallel layout (and accumulation) chosen by the planner: the fastest layout
    that fits this machine and that loom's own checks accept."""
    import dataclasses

    from loom.parallel.plan import check_plan, plan_from_config

    cluster = local_cluster(world, device_type)
    for e in search(cfg.model, cluster, cfg.train.batch_size, cfg.model.block_size):
        if not e.fits:
            break
        settings = layout_settings(e.layout, cfg.train.batch_size)
        parallel = dataclasses.replace(cfg.parallel, auto=False, **{
            k.removeprefix("parallel."): v for k, v in settings.items() if k.startswith("parallel.")})
        train = dataclasses.replace(cfg.train, grad_accum=settings.get("train.grad_accum", 1))
        candidate = dataclasses.replace(cfg, parallel=parallel, train=train, model=layout_model(cfg.model, e.layout))
        try:
            check_plan(plan_from_config(candidate.parallel), candidate, world)
        except ConfigError:
            continue
        return candidate
    raise ConfigError(f"parallel.auto=true: no layout of model={cfg.model.preset} with train.batch_size="
                      f"{cfg.train.batch_size} fits {cluster.describe()}")
