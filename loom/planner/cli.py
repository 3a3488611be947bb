"""``loom plan``: search (or evaluate) plans of a model on a cluster and print them ranked; ``loom
calibrate``; and reading a saved plan for ``loom train --plan``."""

from __future__ import annotations

import json
from pathlib import Path

from loom.config import ConfigError
from loom.parallel.plan import Plan
from loom.planner.cost import Estimate, estimate
from loom.planner.hardware import Cluster, parse_cluster
from loom.planner.search import fixed_plan, search

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
    if args.seq is not None and args.seq < 1:
        raise ConfigError(f"--seq {args.seq} must be at least 1 (default: model.block_size={cfg.block_size})")
    if args.top < 1:
        raise ConfigError(f"--top {args.top} must be at least 1")
    seq = args.seq or cfg.block_size
    if seq > cfg.block_size:
        raise ConfigError(f"--seq {seq} exceeds model.block_size={cfg.block_size}")
    if args.global_batch < 1:
        raise ConfigError(f"--global-batch {args.global_batch} must be at least 1")
    cluster = parse_cluster(args.cluster, args.profile)
    if args.fix:
        fixed = fixed_plan(cfg, args.fix, cluster, args.global_batch)
        results = [estimate(cfg, fixed.plan, cluster, args.global_batch, seq, vocab_size=fixed.vocab_size)]
    else:
        results = search(cfg, cluster, args.global_batch, seq)
        if not results[0].fits:
            raise ConfigError(f"no layout of model={cfg.preset} fits {cluster.describe()} with batches of "
                              f"{args.global_batch} × {seq} tokens; add devices or use larger ones")
    shown = results[: max(1, args.top)]
    best = shown[0]
    if args.json:
        print(json.dumps([_record(e) for e in shown], indent=2, allow_nan=False))
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

        title = f"{cfg.preset} on {args.cluster}: {best.describe()}"
        out = plot_plan(best, cluster, Path(args.png), title=title)
        if not args.json:
            print(f"picture: {out}")
    if args.verify:
        return _verify(cfg, best, cluster, args.json)
    return 0


def _verify(cfg, best: Estimate, cluster: Cluster, quiet: bool) -> int:
    from loom.planner.verify import verify

    rows = verify(cfg, best.plan, vocab_size=best.vocab_size)
    ok = all(abs(r["relative_difference"]) < 1e-9 for r in rows)
    if not quiet:
        for r in rows:
            print(f"verify rank {r['rank']} (stage {r['stage']}): {r['params_counted']:,} parameters held, "
                  f"{r['params_predicted']:,} predicted ({r['seconds']:.1f} s)")
        print("verify: " + ("every checked rank holds what the cost model assumed" if ok else "MISMATCH"))
    return 0 if ok else 1


def _record(e: Estimate) -> dict:
    return {"plan": e.plan.to_dict(), "layout": e.describe(), "micro_batch": e.micro_batch,
            "vocab_size": e.vocab_size, "step_time_s": e.step_time_s, "tflops_per_device": e.tflops_per_device,
            "mfu": e.mfu, "memory_gb_per_device": e.memory_gb_per_device, "fits": e.fits,
            "microbatches": e.microbatches, "time_s": e.time_s, "memory_gb": e.memory_gb,
            "memory_per_stage_gb": e.memory_per_stage_gb}


def table(estimates: list[Estimate]) -> str:
    head = ["#", "layout", "step s", "TFLOP/s/dev", "MFU", "GiB/dev", "fits"] + [t.replace("pp_", "") for t in TERMS]
    rows = [[str(i + 1), e.describe(), f"{e.step_time_s:.3g}", f"{e.tflops_per_device:.1f}",
             f"{100 * e.mfu:.1f}%", f"{e.memory_gb_per_device:.1f}", "yes" if e.fits else "NO"]
            + [f"{e.time_s[t]:.3g}" for t in TERMS] for i, e in enumerate(estimates)]
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]

    def fmt(r: list[str]) -> str:
        return "  ".join(v.ljust(w) if c == 1 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths)))

    return "\n".join([fmt(head), *map(fmt, rows)])


# --------------------------------------------------------------------------------------------
# loom train --plan FILE
# --------------------------------------------------------------------------------------------


def read_plan(path: str | Path) -> tuple[dict[str, object], int]:
    """The config settings (``section.key`` -> value) of a plan written by ``loom plan --out``: its
    layout, its global batch and the vocabulary padded for it; and its number of processes."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--plan {str(p)!r} does not exist; write one with `loom plan ... --out FILE`")
    try:
        d = json.loads(p.read_text())
        fields, vocab = dict(d["plan"]), d.get("vocab_size", 0)
        if "micro_batch" in fields:  # written before plans and layouts were one type: a layout and its batch
            from loom.planner.cost import plan_for_batch

            micro, vocab = fields.pop("micro_batch"), fields.pop("vocab_size", 0)
            plan = plan_for_batch(d["global_batch"], micro, **fields)
        else:
            plan = Plan.from_dict(fields)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--plan {str(p)!r} is not a plan written by `loom plan --out` ({e})") from None
    return plan_settings(plan, d.get("global_batch"), vocab), plan.world_size


def plan_settings(plan: Plan, global_batch: int | None, vocab_size: int = 0) -> dict[str, object]:
    """The config settings that train with ``plan``, batches of ``global_batch`` and the padded vocabulary."""
    out: dict[str, object] = {f"parallel.{k}": getattr(plan, k) for k in ("dp", "tp", "pp", "ep", "sp", "zero",
                                                                          "recompute")}
    out["parallel.microbatches"] = plan.microbatches
    out["train.grad_accum"] = plan.grad_accum
    if vocab_size:
        out["model.vocab_size"] = vocab_size
    if plan.pp > 1:
        out.update({"parallel.schedule": plan.schedule, "parallel.virtual_stages": plan.virtual_stages})
    if global_batch:
        out["train.batch_size"] = global_batch
    return out


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
