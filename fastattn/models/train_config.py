"""The options of a training run: per-preset defaults, the command line, and how the
value of an option is chosen (given > checkpoint's on ``--resume`` > preset > default)."""
from __future__ import annotations

import argparse
import os
from typing import Any

from fastattn.models.gpt import ATTENTION, POS, PRESETS
from fastattn.nn import MLPS, NORMS

# Training defaults per preset; anything not here comes from DEFAULTS.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=20, max_steps=500,
                 eval_interval=100, eval_iters=10),
    "small": dict(batch_size=16, lr=1e-3, min_lr=1e-4, warmup_steps=100, max_steps=5000,
                  eval_interval=250, eval_iters=20),
    # GPT-2's ~0.5M tokens per step: 16 rows × 1024 tokens × 32 accumulation steps.
    "gpt2": dict(batch_size=16, grad_accum=32, lr=6e-4, min_lr=6e-5, warmup_steps=700,
                 max_steps=20000, eval_interval=500, eval_iters=40),
}
DEFAULTS: dict[str, Any] = dict(
    preset="tiny", data=None, tokenizer="byte", vocab_size=None, val_fraction=0.05,
    cache_dir=None, attention="fast", n_layer=None, n_head=None, n_kv_head=None,
    n_embd=None, block_size=None, mlp_hidden=None, dropout=None, bias=None,
    approximate=None, checkpointing=None, pos=None, mlp=None, norm=None, batch_size=16,
    grad_accum=1, max_steps=1000, lr=1e-3, min_lr=1e-4, warmup_steps=100, weight_decay=0.1,
    beta1=0.9, beta2=0.95, grad_clip=1.0, device="auto", dtype="auto", compile=False,
    fsdp=False, seed=0, peak_tflops=None, out_dir=None, eval_interval=250, eval_iters=20,
    log_interval=10, ckpt_interval=None, keep_checkpoints=False, resume=None,
    sink_threshold=0.5, progress=True, plot=True)
MODEL_FLAGS = ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "mlp_hidden",
               "dropout", "bias", "approximate", "checkpointing", "attention", "pos", "mlp",
               "norm")
SHAPE_FLAGS = ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "mlp_hidden", "bias",
               "pos", "mlp", "norm")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Register the training options on ``p`` (``fastattn train`` / ``python -m
    fastattn.train``). Options left unset take, in order: the checkpoint's value on
    ``--resume``, the preset's, then the built-in default shown in the help."""
    g = p.add_argument_group("data")
    g.add_argument("--data", help="text file or folder of text files (default: the Python "
                                  "standard library's *.py sources)")
    g.add_argument("--tokenizer", choices=["byte", "bpe"],
                   help="byte: UTF-8 bytes, vocab 256 (default); bpe: byte-level BPE "
                        "trained on the data, saved as <out-dir>/tokenizer.json")
    g.add_argument("--vocab-size", type=int, help="BPE vocabulary (default 4096; 50257 "
                                                  "with --preset gpt2)")
    g.add_argument("--val-fraction", type=float, help="tail of the token stream held out "
                                                      "for validation (default 0.05)")
    g.add_argument("--cache-dir", help="where encoded tokens and tokenizers are cached "
                                       "(default $FASTATTN_CACHE or ~/.cache/fastattn)")
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=list(PRESETS), help="model and training defaults "
                   "(default tiny): " + "; ".join(
                       f"{k}: {v['n_layer']} layers, {v['n_head']} heads, width "
                       f"{v['n_embd']}, block {v['block_size']}" for k, v in PRESETS.items()))
    g.add_argument("--attention", choices=ATTENTION, help="fast: fastattn kernels "
                   "(default); naive: the textbook T×T attention and torch modules")
    for flag, kind in (("n-layer", int), ("n-head", int), ("n-kv-head", int), ("n-embd", int),
                       ("block-size", int), ("mlp-hidden", int), ("dropout", float)):
        g.add_argument(f"--{flag}", type=kind, help="override the preset")
    g.add_argument("--bias", action=argparse.BooleanOptionalAction,
                   help="biases in Linears and LayerNorms (default on)")
    g.add_argument("--approximate", choices=["none", "tanh"], help="GELU form (default none)")
    g.add_argument("--checkpointing", action=argparse.BooleanOptionalAction,
                   help="activation checkpointing: recompute each block in backward")
    # Llama-style: --pos rope --mlp swiglu --norm rms (with --no-bias, --n-kv-head).
    g.add_argument("--pos", choices=POS, help="positions: learned embeddings (default) or "
                                              "rope (rotary q, k)")
    g.add_argument("--mlp", choices=MLPS, help="feed-forward: gelu (default) or swiglu")
    g.add_argument("--norm", choices=NORMS, help="norms: layer (default) or rms")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, help="rows per micro-batch per rank")
    g.add_argument("--grad-accum", type=int, help="micro-batches per step (default 1)")
    g.add_argument("--max-steps", type=int, help="optimizer steps (tiny: 500)")
    g.add_argument("--lr", type=float, help="peak learning rate (tiny: 3e-3)")
    g.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, help="AdamW decay of matrices and "
                                                      "embeddings (default 0.1)")
    g.add_argument("--beta1", type=float, help="AdamW beta1 (default 0.9)")
    g.add_argument("--beta2", type=float, help="AdamW beta2 (default 0.95)")
    g.add_argument("--grad-clip", type=float, help="max gradient norm, 0 = off (default 1)")
    g = p.add_argument_group("system")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: cuda if "
                                                                     "available")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype (auto: bf16 on GPUs with it, else fp16 with loss "
                        "scaling; fp32 on CPU)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the model")
    g.add_argument("--fsdp", action=argparse.BooleanOptionalAction,
                   help="under torchrun, shard with FSDP2 instead of DDP")
    g.add_argument("--seed", type=int, help="seed of init, batches and dropout (default 0)")
    g.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: the "
                   "data sheet for known GPUs, else a measured matmul)")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--out-dir", help="run folder (default runs/<preset>)")
    g.add_argument("--eval-interval", type=int, help="steps between evaluations")
    g.add_argument("--eval-iters", type=int, help="batches per evaluation loss")
    g.add_argument("--log-interval", type=int, help="steps between log lines (default 10)")
    g.add_argument("--ckpt-interval", type=int, help="steps between checkpoints (default: "
                                                     "the eval interval); always at the end")
    g.add_argument("--keep-checkpoints", action=argparse.BooleanOptionalAction,
                   help="also keep ckpt-<step>.pt for every checkpoint")
    g.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                   help="continue from CKPT (a file or run folder; default "
                        "<out-dir>/ckpt.pt)")
    g.add_argument("--sink-threshold", type=float, help="report heads whose first-token "
                                                        "attention share exceeds this (0.5)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction,
                   help="progress bar (tqdm if installed; default on)")
    g.add_argument("--plot", action=argparse.BooleanOptionalAction,
                   help="write loss.png at the end (needs matplotlib; default on)")


def parse_train_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fastattn.train",
                                     description="Train a fastattn GPT on text.")
    add_train_arguments(parser)
    return parser.parse_args(argv)


def resolve_args(args: argparse.Namespace, saved: dict | None = None) -> argparse.Namespace:
    """Fill unset options: checkpoint's ``saved`` args, then the preset, then DEFAULTS."""
    given = {k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}
    saved = {k: v for k, v in (saved or {}).items() if k in DEFAULTS and v is not None}
    saved.pop("resume", None)
    preset = given.get("preset", saved.get("preset", DEFAULTS["preset"]))
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    merged = {**DEFAULTS, **TRAIN_PRESETS[preset], **saved, **given}
    out = argparse.Namespace(**merged)
    out.out_dir = out.out_dir or os.path.join("runs", preset)
    out.ckpt_interval = out.ckpt_interval or out.eval_interval
    for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_iters",
                 "log_interval", "ckpt_interval"):
        if getattr(out, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(out, name)}")
    if out.warmup_steps < 0 or out.lr <= 0 or out.min_lr < 0 or out.grad_clip < 0:
        raise ValueError("--warmup-steps, --min-lr and --grad-clip must be >= 0 and --lr > 0")
    return out


def plain_args(args: argparse.Namespace) -> dict:
    """The options as JSON-able values (what checkpoints and config.json store)."""
    return {k: v for k, v in vars(args).items()
            if k in DEFAULTS and (v is None or isinstance(v, (str, int, float, bool)))}


__all__ = ["DEFAULTS", "MODEL_FLAGS", "SHAPE_FLAGS", "TRAIN_PRESETS", "add_train_arguments",
           "parse_train_args", "plain_args", "resolve_args"]
