"""``loom`` on the command line: train | generate | eval | predict | export | import | plot | describe | plan |
calibrate.

Configuration errors are one line on stderr and exit code 2, before any work starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from tqdm import tqdm

from loom.data import DataError
from loom.errors import ConfigError, RunError
from loom.train.checkpoint import CheckpointError

USER_ERRORS = (ConfigError, DataError, RunError, CheckpointError)
log = logging.getLogger("loom")


class _TqdmHandler(logging.Handler):
    """Log lines that do not tear through a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def _setup_logging() -> None:
    if not log.handlers:
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loom", description="Train Transformer language models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (defaults: gpt-mini on the Python standard library)")
    t.add_argument("overrides", nargs="*", help="key=value settings, e.g. model=pangu-mini train.steps=200")
    t.add_argument("--config", help="a YAML file of settings (overrides still apply on top)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest checkpoint")
    t.add_argument("--data", metavar="PATH", help="your corpus: .txt/.jsonl/.md/.py files or folders "
                   "(same as data.path=PATH; default: the Python standard library)")
    t.add_argument("--plan", metavar="FILE", help="train with a layout written by `loom plan ... --out FILE` "
                   "(its parallel settings and batch come first; key=value overrides still apply)")
    t.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="start N local processes (one per device) for a parallel layout; parallel.dp defaults "
                   "to N / (tp × pp × ep). Multi-node: torchrun ... -m loom train ...")
    t.add_argument("--max-restarts", type=int, default=0, metavar="K",
                   help="with --nproc: start the processes again up to K times when one fails; they resume "
                   "from the run's newest valid checkpoint (torchrun --max-restarts does the same)")

    g = sub.add_parser("generate", help="sample text from a trained run")
    g.add_argument("run_dir")
    g.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    g.add_argument("--text", default=None, help="a seq2seq run's source text (for a language model: --prompt)")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to generate at most (default: 200; a seq2seq run's target: its block_size)")
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--no-cache", action="store_true", help="recompute the whole context every token")
    g.add_argument("--device", default="auto")
    _add_beam_arguments(g)
    g.add_argument("--n-best", type=int, default=1, help="seq2seq: print the N best hypotheses of the beam")

    e = sub.add_parser("eval", help="validation loss and perplexity of a trained run")
    e.add_argument("run_dir")
    e.add_argument("--batches", type=int, default=None, help="validation batches (default: train.eval_batches)")
    e.add_argument("--device", default="auto")
    _add_beam_arguments(e)
    e.add_argument("--examples", type=int, default=None,
                   help="seq2seq: decode the first N held-out pairs for BLEU (default: all)")

    pr = sub.add_parser("predict", help="the label a classification run gives a text (--text) or an image "
                                         "classification run an image (--image), with its probability")
    pr.add_argument("run_dir")
    pr.add_argument("--text", help="the text to classify (a classification run)")
    pr.add_argument("--image", metavar="PATH", help="the image file to classify (an image_classification run)")
    pr.add_argument("--top-k", type=int, default=1, help="print the K most probable labels (default 1)")
    pr.add_argument("--json", action="store_true", help="print the answer as one JSON object")
    pr.add_argument("--device", default="auto")

    x = sub.add_parser("export", help="write a trained run's weights as one layout-free safetensors file, or as a "
                                      "Hugging Face model directory (--format hf)")
    x.add_argument("run_dir")
    x.add_argument("dest", nargs="?", help="where to write it (same as --out)")
    x.add_argument("--out", help="where to write it (default: RUN_DIR/model.safetensors; --format hf: a new directory)")
    x.add_argument("--format", choices=("safetensors", "hf"), default="safetensors",
                   help="safetensors: loom's names, one file; hf: config.json, weights and tokenizer that "
                        "transformers' Auto classes load")
    x.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="--format hf: N local processes share the reading and writing, each its share of every "
                        "weights file's tensors (default 1)")

    im = sub.add_parser("import", help="make a run directory (config, tokenizer, checkpoint) from a Hugging Face "
                                       "model directory on local disk")
    im.add_argument("model_dir", help="a directory saved by transformers (config.json, weights, tokenizer files)")
    im.add_argument("--out", required=True, metavar="RUN_DIR", help="the run directory to make")
    im.add_argument("overrides", nargs="*", help="key=value settings recorded in the run, e.g. train.precision=bf16")

    pl = sub.add_parser("plot", help="draw the loss curve of a run to RUN_DIR/loss.png (and, for a Mixture-of-"
                                     "Experts model, the expert load to RUN_DIR/expert_load.png)")
    pl.add_argument("run_dir")
    pl.add_argument("--out", help="where to write the loss curve (an expert-load picture goes beside it as "
                                  "STEM_expert_load.png)")

    from loom.planner.cli import add_arguments

    add_arguments(sub.add_parser("plan", help="search the parallel layouts of a model on a cluster: predicted step "
                                              "time, MFU and memory per device, before anything is launched"))

    c = sub.add_parser("calibrate", help="measure this machine (matmul rate, collectives over gloo, fixed costs) "
                                         "and save the profile `loom plan` and parallel.auto use")
    c.add_argument("--nproc", type=int, default=4, help="concurrent gloo processes to measure with (default 4)")
    c.add_argument("--out", help="where to write the profile (default: ~/.cache/loom/calibration.json)")
    c.add_argument("--quick", action="store_true", help="small sizes: seconds instead of a minute or two")

    d = sub.add_parser("describe", help="parameters, FLOPs and memory of a model, without allocating it")
    d.add_argument("model", nargs="?", default=None, help="a preset name (see `loom describe --list`)")
    d.add_argument("overrides", nargs="*", help="model.key=value settings")
    d.add_argument("--list", action="store_true", help="list the presets")
    return p


def _add_beam_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beam", type=int, default=1, help="seq2seq: beam search of N hypotheses (default 1: greedy)")
    p.add_argument("--alpha", type=float, default=0.6,
                   help="seq2seq beam search: length penalty ((5 + |Y|) / 6) ** alpha (Wu et al. 2016; 0: none)")


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)  # key=value settings may come after --options too
    if getattr(args, "dest", "") is None and len(extra) == 1 and not extra[0].startswith("-"):
        args.dest, extra = extra[0], []  # `loom export RUN --format hf OUT`: a positional after an option
    if extra and (not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra)):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    _setup_logging()
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as e:
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank meets the same error
            print(f"loom: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that cannot be read or written: the user's to fix, not a bug
        print(f"loom: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loom: interrupted", file=sys.stderr)
        return 130


def cmd_train(args) -> int:
    from loom.config import load_config
    from loom.parallel.launch import env_world_size, resolve_device
    from loom.planner.auto import plan_job
    from loom.train.rundir import load_resume_config

    overrides = [*args.overrides, *([f"data.path={args.data}"] if args.data else [])]
    settings = None
    if args.plan:
        from loom.planner.cli import read_plan

        settings, world = read_plan(args.plan)
        if args.nproc == 1 and env_world_size() == 1:
            args.nproc = world  # the plan's number of processes, unless told otherwise
    if args.resume:
        if args.config:
            raise ConfigError("--resume takes the run's own config.yaml; pass changes as key=value overrides")
        from loom.train.hf import check_resumable

        check_resumable(Path(args.resume))
        cfg = load_resume_config(Path(args.resume), overrides, settings)
    else:
        # a Hugging Face model directory or loom run named on the command line is read before the overrides are
        # checked, so that they may name what only its model has (train.task=seq2seq for a T5)
        init = next((o.split("=", 1)[1] for o in overrides if o.startswith("train.init_from=")), None)
        if not init:
            cfg = load_config(args.config, overrides, settings)
            init = cfg.train.init_from  # or named in the config file
        if init:  # a model directory or a run: the model is the one its weights are for
            cfg = _init_from_config(init, overrides, args.config, settings)
    if args.nproc < 1:
        raise ConfigError(f"--nproc={args.nproc} must be at least 1")
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts={args.max_restarts} must be at least 0")
    launching = args.nproc > 1 and env_world_size() == 1
    world = args.nproc if launching else env_world_size()
    device = resolve_device(cfg.train.device)
    # the one place the job's layout is decided; everything below receives it
    cfg, plan = plan_job(cfg, world, device.type)
    if launching:
        return _launch_train(cfg, plan, args.nproc, args.resume, device, args.max_restarts)
    return _run_train(cfg, plan, args.resume)


def _init_from_config(path: str, overrides: list[str], config_file: str | None, settings: dict | None):
    """The job's config when it starts from ``path``'s weights: a Hugging Face model directory's model or a
    loom run's, with the config file and overrides on top."""
    from loom.models.hf import is_hf_dir
    from loom.train.hf import hf_init_config
    from loom.train.init_from import is_run_dir, run_init_config

    if is_hf_dir(path):
        return hf_init_config(path, overrides, config_file, settings)
    if is_run_dir(path):  # a loom run: its model, its weights loaded by name and shape
        return run_init_config(path, overrides, config_file, settings)
    raise ConfigError(f"train.init_from={path} is neither a loom run directory (config.yaml, checkpoints/) nor a "
                      "Hugging Face model directory (config.json with a model_type, weights, tokenizer files)")


def _run_train(cfg, plan, resume: str | None) -> int:
    from loom.parallel.launch import shutdown_process_group
    from loom.train.job import train

    summary = train(cfg, plan, Path(resume), resume=True) if resume else train(cfg, plan)
    shutdown_process_group()  # every rank got here: leave the job in order (see its docstring)
    if summary.get("finished", True):
        return 0
    # stopped by a signal after saving a checkpoint: 128 + its number, as a shell reports it (130, 143)
    return 128 + int(getattr(signal.Signals, summary.get("stopped_by", "SIGINT")))


def _launch_train(cfg, plan, nproc: int, resume: str | None, device, max_restarts: int = 0) -> int:
    """Check what the processes need of this machine, then start ``nproc`` workers."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from loom.parallel.launch import launch_local
    from loom.train.memory import check_training_state_fits
    from loom.train.rundir import check_run_unlocked, new_run_dir

    if device.type == "cuda" and torch_device_count() < nproc:
        raise ConfigError(f"--nproc {nproc} needs {nproc} GPUs; this machine has {torch_device_count()}")
    check_training_state_fits(cfg, device, plan, local_processes=nproc)
    if resume:
        check_run_unlocked(Path(resume))  # another job trains it now: one line, before any process starts
    elif not cfg.train.run_dir:  # decided here, so that restarted workers find the same one
        cfg.train.run_dir = str(new_run_dir(cfg))
    try:
        results = launch_local(nproc, _train_worker, cfg, plan, resume, max_restarts=max_restarts)
    except SignalException as e:  # SIGHUP / SIGQUIT: the agent has stopped the workers
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        if codes == {2}:  # a user error: the coordinator has printed it
            return 2
        print(f"loom: error: {len(e.failures)} of {nproc} processes failed:\n{e.format_msg()}", file=sys.stderr)
        return 1
    return max(results.values())


def _train_worker(cfg, plan, resume: str | None) -> int:
    """One process of a local job (started by the elastic launcher)."""
    _setup_logging()
    try:
        return _run_train(cfg, plan, resume)
    except USER_ERRORS as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"loom: error: {e}", file=sys.stderr)
        sys.exit(2)


def torch_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cmd_export(args) -> int:
    from loom.infer.export import export_safetensors

    if args.dest and args.out and args.dest != args.out:
        raise ConfigError(f"two destinations given: {args.dest} and --out {args.out}; give one")
    dest = args.dest or args.out
    if args.format == "hf":
        from loom.infer.hf import export_hf

        if not dest:
            raise ConfigError("--format hf needs a directory to write: loom export RUN --format hf OUT_DIR")
        if args.nproc < 1:
            raise ConfigError(f"--nproc={args.nproc} must be at least 1")
        print(export_hf(Path(args.run_dir), Path(dest), nproc=args.nproc))
        return 0
    if args.nproc != 1:
        raise ConfigError(f"--nproc={args.nproc} shares a --format hf export; --format safetensors writes one file "
                          "from one process")
    out = export_safetensors(Path(args.run_dir), Path(dest) if dest else None)
    print(out)
    return 0


def cmd_import(args) -> int:
    from loom.train.hf import import_hf

    out = import_hf(args.model_dir, args.out, args.overrides)
    print(out)
    return 0


def cmd_generate(args) -> int:
    import torch

    from loom.infer.generate import generate
    from loom.infer.load import load_for_inference

    _check_sampling(args)
    _check_generative(Path(args.run_dir))
    cfg, model, tok, _ = load_for_inference(Path(args.run_dir), args.device)
    if _is_seq2seq(cfg):
        return _generate_seq2seq(args, cfg, model, tok)
    if args.beam != 1 or args.n_best != 1:
        raise ConfigError("--beam and --n-best are for seq2seq runs (an encoder-decoder); a language model "
                          "samples (--temperature 0: greedy)")
    if args.text is not None:
        if args.prompt:
            raise ConfigError("give --prompt or --text, not both")
        args.prompt = args.text
    if args.max_new_tokens is None:
        args.max_new_tokens = 200
    device = next(model.parameters()).device
    ids = tok.start_ids + tok.encode(args.prompt) if args.prompt else tok.start_ids or [tok.eos_id]
    room = cfg.model.block_size - args.max_new_tokens
    if room < 1:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens} leaves no room for a prompt in "
                          f"block_size={cfg.model.block_size}")
    if len(ids) > room:
        log.warning("prompt cut to its last %d tokens to leave room for %d new ones", room, args.max_new_tokens)
        ids = ids[-room:]
    idx = torch.tensor([ids] * args.num_samples, device=device)
    out = generate(model, idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                   seed=args.seed, use_cache=not args.no_cache, stop_token=tok.eos_id, vocab_size=tok.vocab_size)
    for i, row in enumerate(out.tolist()):
        new = row[len(ids):]
        if tok.eos_id in new:  # the end of a document ends the sample
            new = new[: new.index(tok.eos_id)]
        if args.num_samples > 1:
            print(f"--- sample {i}")
        print(tok.decode((ids if args.prompt else []) + new))
    return 0


def _check_generative(run_dir: Path) -> None:
    """``loom generate`` continues text: a run of another task (an encoder's) is one line."""
    from loom.config import task_name
    from loom.train.rundir import load_run_config

    task = task_name(load_run_config(run_dir))
    if task not in ("causal_lm", "sft", "seq2seq"):
        hint = f"loom predict {run_dir} --text/--image" if "classification" in task else f"loom eval {run_dir}"
        raise ConfigError(f"{run_dir} is a train.task={task} run; loom generate continues text with a causal_lm or sft "
                          f"run, or decodes a seq2seq run (for this one: {hint})")


def _is_seq2seq(cfg) -> bool:
    from loom.config import task_name

    return task_name(cfg) == "seq2seq"


def _generate_seq2seq(args, cfg, model, tok) -> int:
    """A seq2seq run: the source text decoded greedily or by beam search; the best target printed (or
    the ``--n-best`` best, each with its score)."""
    import torch

    from loom.infer.decode import beam_search, greedy_decode
    from loom.infer.seq2seq import detokenizer, special_ids
    from loom.tasks.seq2seq import Seq2Seq
    from loom.train.precision import autocast

    text = args.text if args.text is not None else args.prompt
    if args.text is not None and args.prompt:
        raise ConfigError("give --text (or --prompt), not both")
    if not text.strip():
        raise ConfigError("a seq2seq run turns a source into a target: give the source with --text \"...\"")
    block = cfg.model.block_size
    max_len = args.max_new_tokens if args.max_new_tokens is not None else block
    if max_len > block:
        raise ConfigError(f"--max-new-tokens={max_len}: the decoder holds block_size={block} positions")
    device = next(model.parameters()).device
    ids = special_ids(tok)
    src = torch.tensor([Seq2Seq.encode_source(tok, text, block)], device=device)
    detok = detokenizer(tok)
    with autocast(device, cfg.train.precision):
        if args.beam == 1:
            print(detok(greedy_decode(model, src, ids["bos_id"], ids["eos_id"], max_len, use_cache=not args.no_cache,
                                      vocab_size=tok.vocab_size)[0]))
            return 0
        hyps = beam_search(model, src, ids["bos_id"], ids["eos_id"], max_len, beam=args.beam, alpha=args.alpha,
                           n_best=args.n_best, use_cache=not args.no_cache, vocab_size=tok.vocab_size)[0]
    for i, h in enumerate(hyps):
        if args.n_best > 1:
            print(f"--- {i + 1} (score {h.score:.4f}, log-probability {h.logprob:.4f})")
        print(detok(h.tokens))
    return 0


def _check_sampling(args) -> None:
    for flag, ok, valid in [("--max-new-tokens", args.max_new_tokens is None or args.max_new_tokens >= 1, ">= 1"),
                            ("--beam", args.beam >= 1, ">= 1 (1: greedy)"),
                            ("--n-best", 1 <= args.n_best <= args.beam, "between 1 and --beam"),
                            ("--alpha", args.alpha >= 0, ">= 0 (0: no length penalty)"),
                            ("--num-samples", args.num_samples >= 1, ">= 1"),
                            ("--temperature", args.temperature >= 0, ">= 0 (0: greedy)"),
                            ("--top-k", args.top_k >= 0, ">= 0 (0: no top-k filter)"),
                            ("--top-p", 0 < args.top_p <= 1, "in (0, 1] (1: no nucleus filter)")]:
        if not ok:
            raise ConfigError(f"{flag}={getattr(args, flag[2:].replace('-', '_'))} must be {valid}")


def cmd_eval(args) -> int:
    import json
    import math

    from loom.config import task_name
    from loom.infer.evaluate import evaluate
    from loom.infer.load import load_for_inference
    from loom.tasks import build_task
    from loom.train.rundir import prepare_run_data

    if args.batches is not None and args.batches < 1:
        raise ConfigError(f"--batches={args.batches} must be >= 1")
    if args.beam < 1 or args.alpha < 0 or (args.examples is not None and args.examples < 1):
        raise ConfigError(f"--beam={args.beam} must be >= 1, --alpha={args.alpha} >= 0, --examples={args.examples} "
                          ">= 1")
    run_dir = Path(args.run_dir)
    cfg, model, tok, step = load_for_inference(run_dir, args.device)
    if not _is_seq2seq(cfg) and (args.beam != 1 or args.examples is not None):
        raise ConfigError("--beam and --examples are for seq2seq runs (an encoder-decoder)")
    data = prepare_run_data(cfg, run_dir / "tokenizer")  # the tokens this model was trained on
    task = build_task(task_name(cfg), data, cfg.model.block_size, cfg.train.batch_size, cfg.train.seed)
    device = next(model.parameters()).device
    result = evaluate(model, task, args.batches or cfg.train.eval_batches, device, cfg.train.precision)
    if _is_seq2seq(cfg):  # decode the held-out sources: BLEU and exact match beside the baselines
        from loom.infer.seq2seq import evaluate_seq2seq

        result |= evaluate_seq2seq(model, task, tok, beam=args.beam, alpha=args.alpha, examples=args.examples,
                                   batch_size=cfg.train.batch_size, device=device, precision=cfg.train.precision)
    bad = {k: v for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:  # JSON has no NaN: say what is wrong instead of printing something no parser reads
        raise RunError(f"the checkpoint of step {step} in {run_dir} gives non-finite "
                       f"{', '.join(f'{k}={v}' for k, v in bad.items())}: its weights hold NaN or infinity")
    print(json.dumps({"step": step, **result, "unigram_entropy_nats": data.meta.get("unigram_entropy_nats")},
                     allow_nan=False))
    return 0


def cmd_predict(args) -> int:
    import json

    from loom.infer.predict import check_predictable, predict

    check_predictable(Path(args.run_dir), args.text, args.image, args.top_k)  # before loading any weights
    result = predict(Path(args.run_dir), args.text, args.image, args.top_k, args.device)
    if args.json:
        print(json.dumps(result))
    else:
        for row in result["top"]:
            print(f"{row['label']}\t{row['probability']:.4f}")
    return 0


def cmd_plot(args) -> int:
    from loom.plot import plot_run
    from loom.train.rundir import check_run_dir

    for out in plot_run(check_run_dir(Path(args.run_dir)), Path(args.out) if args.out else None):
        print(out)
    return 0


def _layers(cfg) -> str:
    """``n_layer``, or encoder + decoder layers where the blocks hold both (an encoder-decoder)."""
    from loom.models import n_blocks

    blocks = n_blocks(cfg)
    return str(cfg.n_layer) if blocks <= cfg.n_layer else f"{cfg.n_layer} encoder + {blocks - cfg.n_layer} decoder"


def cmd_describe(args) -> int:
    from loom.config import load_config
    from loom.models import build_model, count_params, flops_per_token, presets, published_params

    if args.list or args.model is None:
        for name, shape in presets().items():
            print(f"{name:12s} " + " ".join(f"{k}={v}" for k, v in shape.items()))
        return 0
    if any(not o.startswith("model.") for o in args.overrides):
        raise ConfigError(f"describe takes model.key=value settings only, not {args.overrides}")
    cfg = load_config(None, [f"model={args.model}", *args.overrides]).model
    model = build_model(cfg)  # meta device: nothing allocated
    n = count_params(model)
    rows = [
        ("preset", cfg.preset),
        ("shape", f"{cfg.arch}: {_layers(cfg)} layers, d={cfg.n_embd}, ffn={cfg.ffn}, {cfg.n_head} heads"
                  + (f" ({cfg.kv_heads} key/value)" if cfg.kv_heads != cfg.n_head else "")
                  + f", vocab {cfg.vocab_size}, seq {cfg.block_size}"
                  + (f", {cfg.positions} positions" if cfg.positions != "auto" else "")),
        ("parameters", f"{n:,} ({n / 1e9:.3f} B)"),
    ]
    if cfg.preset in published_params():
        pub = published_params()[cfg.preset]
        rows.append(("published", f"{pub / 1e9:.3f} B ({100 * (n / pub - 1):+.2f}%)"))
    moe = cfg.moe
    if moe.experts:  # a dense model's description stays as it was
        from loom.models import matmul_params, n_blocks, n_moe_layers

        every = "every block" if moe.every == 1 else f"every {moe.every}{_ordinal(moe.every)} block"
        capacity = f"capacity factor {moe.capacity_factor:g}" if moe.capacity_factor else "no capacity limit"
        active = matmul_params(cfg)
        rows += [
            ("MoE", f"{n_moe_layers(cfg)} of {n_blocks(cfg)} blocks ({every}): {moe.experts} experts of ffn "
                    f"{cfg.expert_ffn}, router {moe.router}, top_k={moe.top_k}, {capacity}"),
            ("active", f"{active:,} ({active / 1e9:.3f} B) matmul params a token meets (its top_k experts, the "
                       f"router, attention, dense MLPs, output projection)"),
        ]
    rows += [
        ("FLOPs/token", f"{flops_per_token(cfg):.4g} (training, PaLM's 6N + 12LHQT"
                        + (", N = active matmul params)" if moe.experts else ")")),
        ("weights", f"{n * 2 / 2**30:,.1f} GiB in bf16, {n * 4 / 2**30:,.1f} GiB in fp32"),
        ("train state", f"{n * 16 / 2**30:,.1f} GiB (bf16 weights+grads, fp32 master+Adam moments)"),
    ]
    for k, v in rows:
        print(f"{k:12s} {v}")
    return 0


def _ordinal(k: int) -> str:
    return "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")


def cmd_plan(args) -> int:
    from loom.planner.cli import cmd_plan as run

    return run(args)


def cmd_calibrate(args) -> int:
    from loom.planner.cli import cmd_calibrate as run

    return run(args)


COMMANDS = {"plan": cmd_plan, "calibrate": cmd_calibrate, "train": cmd_train, "generate": cmd_generate,
            "eval": cmd_eval, "export": cmd_export, "plot": cmd_plot, "describe": cmd_describe,
            "import": cmd_import, "predict": cmd_predict}


if __name__ == "__main__":
    sys.exit(main())
