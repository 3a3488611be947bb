"""loom's training step beside its peers': the same model shape, batch, loss and AdamW in one process.

    python benchmarks/peers.py                                   # GPT-2, gpt-mini's shape, fp32 and bf16, eager
    python benchmarks/peers.py --shapes mini,30m --rounds 5      # more shapes, more rounds
    python benchmarks/peers.py --family gpt2,llama               # the Llama family as well
    python benchmarks/peers.py --compile                         # torch.compile'd models as well
    python benchmarks/peers.py --compiled-only                   # torch.compile'd models alone
    python benchmarks/peers.py --family llama --impls loom,hf    # some implementations only
    python benchmarks/peers.py --shapes 124m --precisions bf16 --batch 1 --rounds 2 --steps 1   # fewer rows

Two families (``--family``), each in three implementations (``--impls`` filters):

``gpt2``: GPT-2-style (learned positions, pre-LayerNorm blocks, GELU MLP of 4d, tied embedding and
output, biases everywhere, no dropout):

``loom``      loom's model and step: ``parallelize`` on one device (no layout), ``forward_backward``
              under loom's autocast, loom's gradient clipping and its AdamW (``build_optimizers``);
``hf``        Hugging Face transformers' ``GPT2LMHeadModel`` (SDPA attention);
``nanogpt``   a plain-PyTorch GPT written below in nanoGPT's style (fused QKV projection, SDPA).

``llama``: Llama-style (rotary positions, pre-RMSNorm blocks with eps 1e-5, SwiGLU MLP, grouped-query
attention with n_head / 2 key/value heads, no biases, untied output projection as loom's
``llama-*`` presets have it, no dropout):

``loom``      loom's ``model.arch=llama`` through the same step as above;
``hf``        Hugging Face transformers' ``LlamaForCausalLM`` (SDPA attention, ``tie_word_embeddings=False``);
``litgpt``    Lightning AI's litgpt: ``litgpt.model.GPT`` with a Llama-style ``litgpt.config.Config``
              (RMSNorm, ``LLaMAMLP``, full rotary, ``parallel_residual=False``, no bias, the vocabulary
              unpadded).

The Llama FFN width is not derived from d by loom (``model.ffn_hidden`` unset means 4d); every
``llama-*`` preset sets it, and the two small ones follow 8d/3 rounded up to a multiple of 16
(llama-tiny d=64: 176, llama-mini d=192: 512, as many MLP weights as GPT-2's 4d GELU MLP). The
benchmark uses that rule at every shape (d=512: 1376, d=768: 2048) and gives the same width to all
three. At each shape the implementations of a family must hold the same number of parameters: the
script prints the counts and stops if they differ.

litgpt pins ``huggingface_hub<1.4``, which conflicts with transformers 5.x, so it is installed beside
the environment, without its dependencies, and put on the path for this script only:

    python3 -m pip install --no-deps --target /work/peers-site litgpt==0.5.13 lightning==2.6.6 \
        lightning-utilities==0.15.3 torchmetrics==1.9.0 jsonargparse==4.41.0 docstring_parser typeshed_client psutil
    PYTHONPATH=/work/peers-site:$PYTHONPATH python benchmarks/peers.py --family llama

litgpt is a peer of the Llama family only: its ``GPT`` has no learned absolute position embeddings
(rotary positions or none), so it cannot express GPT-2 exactly.

Every step: forward on (batch, seq) random tokens, mean next-token cross-entropy in fp32, backward,
``clip_grad_norm_(1.0)``, AdamW (torch's fused kernel, as loom's; weight decay on matrices) and
``zero_grad``. Precisions: fp32, and bf16 autocast over fp32 weights (on a CPU without bf16
instructions loom's autocast computes its products with fp32 kernels on the bf16 operands, the peers'
run torch's emulated bf16 kernels: docs/training.md, "Mixed precision"). ``--compile``: loom compiles as
``train.compile=true`` does (each block, inductor), the peers ``torch.compile`` their whole model. The
implementations run interleaved step by step (each round times step 1 of every implementation, then
step 2, ...), so a slow stretch of a shared machine hits all of them alike; the table reports each
one's median tokens/s over rounds with the min–max spread, loom's ratio to the fastest peer's median,
and the median (min–max) over rounds of loom's ratio to that round's fastest peer, the figure the
machine's drift cancels out of. Writes JSON (``--out``), one row per family, shape, precision and
eager/compiled.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# name -> (n_layer, n_head, n_embd, seq, vocab, batch)
SHAPES = {
    "tiny": (2, 4, 64, 64, 512, 2),        # a smoke test: 0.1M (gpt2), 0.16M (llama)
    "mini": (4, 4, 192, 256, 4096, 8),     # loom's gpt-mini: 2.6M parameters
    "30m": (6, 8, 512, 256, 16384, 8),     # ~27M
    "124m": (12, 12, 768, 1024, 50304, 4),  # GPT-2 small (vocabulary padded to 50304)
}


# ----------------------------------------------------------------------------------------------
# nanoGPT-style model (plain PyTorch)


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class _Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(d), _Attention(d, heads), nn.LayerNorm(d)
        self.c_fc, self.c_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class NanoGPT(nn.Module):
    def __init__(self, n_layer: int, heads: int, d: int, seq: int, vocab: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.h = nn.ModuleList(_Block(d, heads) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# ----------------------------------------------------------------------------------------------
# The Llama family's derived widths


def llama_dims(shape) -> tuple[int, int]:
    """(key/value heads, FFN width) of the Llama family at ``shape``: n_head / 2 key/value heads and
    8d/3 rounded up to a multiple of 16, as loom's llama-tiny and llama-mini presets have them."""
    _, heads, d, *_ = shape
    return max(1, heads // 2), 16 * math.ceil(8 * d / 3 / 16)


# ----------------------------------------------------------------------------------------------
# The steps


def _adamw(params) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), fused=True)  # as loom's build_optimizer


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def plain_step(model: nn.Module, precision: str, compile_: bool):
    """The step of a model that maps token ids to logits (hf, nanogpt, litgpt)."""
    opt = _adamw(model.parameters())
    params = sum(p.numel() for p in model.parameters())
    forward = torch.compile(model) if compile_ else model

    def step(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = forward(x)
            logits = out.logits if hasattr(out, "logits") else out
        _loss(logits, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.params = params
    return step


def loom_step(family: str, shape, precision: str, compile_: bool):
    """loom's own single-device step (what ``TrainingStep`` runs, less the data loader)."""
    from loom.config import load_config
    from loom.models import build_model, spec_of
    from loom.parallel.parallelize import parallelize
    from loom.parallel.plan import Plan
    from loom.tasks import lm_loss
    from loom.train.precision import autocast
    from loom.train.step import build_optimizers

    n_layer, heads, d, seq, vocab, _ = shape
    if family == "llama":
        kv_heads, ffn = llama_dims(shape)
        model = ["model=llama-mini", f"model.n_kv_head={kv_heads}", f"model.ffn_hidden={ffn}"]
    else:
        model = ["model=gpt-mini"]
    cfg = load_config(None, [*model, f"model.n_layer={n_layer}", f"model.n_head={heads}",
                             f"model.n_embd={d}", f"model.block_size={seq}", f"model.vocab_size={vocab}",
                             "model.dropout=0.0", f"train.precision={precision}", "train.weight_decay=0.1",
                             "train.beta2=0.95"])
    pm = parallelize(build_model(cfg.model), Plan(), None, spec=spec_of(cfg.model), loss_fn=lm_loss,
                     device=torch.device("cpu"), seed=0, compile="inductor" if compile_ else None)
    (opt,) = build_optimizers(pm, cfg.train)

    def step(x, y):
        with autocast(torch.device("cpu"), precision):
            pm.forward_backward((x,), y, lambda v: v)
        pm.clip_grads_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.params = sum(p.numel() for p in pm.parameters())
    step.model = pm
    return step


def hf_gpt2(shape) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    n_layer, heads, d, seq, vocab, _ = shape
    cfg = GPT2Config(n_layer=n_layer, n_head=heads, n_embd=d, n_positions=seq, vocab_size=vocab, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "sdpa"
    return GPT2LMHeadModel(cfg).train()


def hf_llama(shape) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    n_layer, heads, d, seq, vocab, _ = shape
    kv_heads, ffn = llama_dims(shape)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=ffn, num_hidden_layers=n_layer,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_act="silu",
                      max_position_embeddings=seq, rms_norm_eps=1e-5, use_cache=False, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attention_bias=False,
                      attention_dropout=0.0, mlp_bias=False, bos_token_id=0, eos_token_id=0, pad_token_id=None)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).train()


LITGPT_MISSING = ("litgpt not installed: pip install --no-deps --target DIR litgpt==0.5.13 lightning==2.6.6 "
                  "lightning-utilities==0.15.3 torchmetrics==1.9.0 jsonargparse==4.41.0 docstring_parser "
                  "typeshed_client psutil, then PYTHONPATH=DIR (see this script's docstring); "
                  "or --impls without litgpt")


def litgpt_llama(shape) -> nn.Module:
    try:
        from litgpt.config import Config
        from litgpt.model import GPT
    except ImportError as e:
        raise SystemExit(f"peers.py: error: {LITGPT_MISSING} ({e})") from None

    n_layer, heads, d, seq, vocab, _ = shape
    kv_heads, ffn = llama_dims(shape)
    cfg = Config(name="peers-llama", block_size=seq, vocab_size=vocab, padded_vocab_size=vocab, n_layer=n_layer,
                 n_head=heads, n_embd=d, n_query_groups=kv_heads, rotary_percentage=1.0, rope_base=10000,
                 parallel_residual=False, bias=False, norm_class_name="RMSNorm", norm_eps=1e-5,
                 mlp_class_name="LLaMAMLP", intermediate_size=ffn)
    return GPT(cfg).train()


FAMILIES = {
    "gpt2": {"loom": None, "hf": hf_gpt2, "nanogpt": lambda shape: NanoGPT(*shape[:5])},
    "llama": {"loom": None, "hf": hf_llama, "litgpt": litgpt_llama},
}


def build(family: str, impl: str, shape, precision: str, compile_: bool):
    torch.manual_seed(0)
    if impl == "loom":
        return loom_step(family, shape, precision, compile_)
    return plain_step(FAMILIES[family][impl](shape).train(), precision, compile_)


# ----------------------------------------------------------------------------------------------


def _names(arg: str, known, what: str, p: argparse.ArgumentParser) -> list[str]:
    names = [n for n in arg.split(",") if n]
    bad = [n for n in names if n not in known]
    if bad or not names:
        p.error(f"--{what} {arg}: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(known)}")
    return names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="gpt2", help=f"comma-separated, of {', '.join(FAMILIES)}")
    p.add_argument("--shapes", default="mini", help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--impls", default=None,
                   help="comma-separated filter (default: all: gpt2 loom,hf,nanogpt; llama loom,hf,litgpt)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    p.add_argument("--compiled-only", action="store_true", help="time the torch.compile'd models alone")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per implementation and round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before the first round (compile: 2)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--batch", type=int, default=None,
                   help="rows per step instead of each shape's own (bf16 at 124m on a CPU without bf16 units)")
    p.add_argument("--out", default="benchmarks/out/peers.json")
    args = p.parse_args()
    families = _names(args.family, FAMILIES, "family", p)
    shapes = _names(args.shapes, SHAPES, "shapes", p)
    precisions = _names(args.precisions, ("fp32", "bf16"), "precisions", p)
    every_impl = list(dict.fromkeys(i for f in families for i in FAMILIES[f]))
    wanted = _names(args.impls, every_impl, "impls", p) if args.impls is not None else every_impl
    if "litgpt" in wanted and "llama" in families:
        try:
            import litgpt.model  # noqa: F401  (imported here to fail before any timing)
        except ImportError:
            p.exit(2, f"peers.py: error: {LITGPT_MISSING}\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [True] if args.compiled_only else [False, True] if args.compile else [False]
    rows = []
    for family in families:
        impls = [i for i in FAMILIES[family] if i in wanted]
        if not impls:
            continue
        for shape_name in shapes:
            shape = SHAPES[shape_name]
            batch, seq, vocab = args.batch or shape[5], shape[3], shape[4]
            counted = False
            for precision in precisions:
                for compiled in modes:
                    steps = {i: build(family, i, shape, precision, compiled) for i in impls}
                    params = {i: steps[i].params for i in impls}
                    if not counted:
                        print(f"{family} {shape_name} parameters: "
                              + "  ".join(f"{i} {n:,}" for i, n in params.items()), flush=True)
                        counted = True
                    if len(set(params.values())) > 1:
                        raise SystemExit(f"peers.py: error: {family} {shape_name}: the implementations hold different "
                                         f"numbers of parameters ({params}); their configurations have drifted apart")
                    gen = torch.Generator().manual_seed(0)
                    data = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
                    x, y = data[:, :-1], data[:, 1:]
                    for i in impls:  # warm-up (and compilation)
                        for _ in range(args.warmup + (1 if compiled else 0)):
                            steps[i](x, y)
                    per_round: dict[str, list[float]] = {i: [] for i in impls}
                    for _ in range(args.rounds):
                        times: dict[str, list[float]] = {i: [] for i in impls}
                        for _ in range(args.steps):  # step by step in turn: a slow second hits all alike
                            for i in impls:
                                t0 = time.perf_counter()
                                steps[i](x, y)
                                times[i].append(time.perf_counter() - t0)
                        for i in impls:
                            per_round[i].append(batch * seq / statistics.median(times[i]))
                    tps = {i: statistics.median(v) for i, v in per_round.items()}
                    peers = {i: v for i, v in tps.items() if i != "loom"}
                    best = max(peers, key=peers.get) if peers else None
                    ratio = tps["loom"] / peers[best] if best and "loom" in tps else None
                    # loom against the fastest peer of the same round: the machine's drift cancels out
                    by_round = ([per_round["loom"][r] / max(per_round[i][r] for i in peers) for r in range(args.rounds)]
                                if peers and "loom" in tps else [])
                    row = {"family": family, "shape": shape_name, "precision": precision, "compiled": compiled,
                           "batch": batch, "seq": seq,
                           "tokens_per_s": tps, "rounds_tokens_per_s": per_round, "params": params,
                           "best_peer": best, "loom_vs_best_peer": ratio,
                           "loom_vs_best_peer_by_round": by_round,
                           "loom_vs_best_peer_round_median": statistics.median(by_round) if by_round else None}
                    rows.append(row)
                    spread = "  ".join(f"{i} {tps[i]:,.0f} ({min(v):,.0f}–{max(v):,.0f})" for i, v in per_round.items())
                    shown = (f"  loom/{best} {ratio:.2f}; by round {statistics.median(by_round):.2f} "
                             f"({min(by_round):.2f}–{max(by_round):.2f})" if ratio is not None else "")
                    print(f"{family:5} {shape_name:5} {precision:4} {'compiled' if compiled else 'eager':8} "
                          f"tokens/s: {spread}{shown}", flush=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "load_average": os.getloadavg(), "rounds": args.rounds, "steps": args.steps,
            "families": families}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
