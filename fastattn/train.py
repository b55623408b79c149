"""Train a GPT on text files, and sample from its checkpoints.

    python -m fastattn.train --preset tiny --max-steps 50        # CPU, seconds
    python -m fastattn.train --preset small --data my_texts/ --tokenizer bpe
    torchrun --nproc-per-node 8 -m fastattn.train --preset gpt2   # DDP (--fsdp to shard)
    python -m fastattn.train --resume --out-dir runs/tiny          # continue exactly
    python -m fastattn.sample --checkpoint runs/tiny --prompt "def "

The loop: AdamW (fused on CUDA) with weight decay on matrices and embeddings only,
linear warmup then cosine decay of the learning rate, gradient accumulation, gradient
clipping, mixed precision (bf16 autocast on GPUs that have it, fp16 with a GradScaler on
the others, fp32 on CPU), optional ``torch.compile``. Every ``--eval-interval`` steps:
the mean loss on ``--eval-iters`` fixed train and val batches, and each layer's
attention-sink share (``GPT.sink_shares``). Output in ``--out-dir``: ``log.jsonl`` (one JSON
object per log line), ``ckpt.pt``, ``config.json``, ``tokenizer.json`` (BPE) and
``loss.png``.

Checkpoints are written atomically (temporary file in the same folder, fsync,
``os.replace``) and hold the model, optimizer, scaler, step, every rank's RNG states
(python, numpy, torch, cuda) and batch-sampler state, the config, tokenizer and
arguments: ``--resume`` continues with the same batches and dropout masks, so a resumed
run repeats the uninterrupted one.

Under ``torchrun`` the model is wrapped in DistributedDataParallel (``--fsdp``: sharded
with FSDP2's ``fully_shard``); each rank draws its own batches (sampler seeded with
``[seed, rank]``); only rank 0 prints, logs and writes files. CPU runs use gloo.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastattn import data as D
from fastattn.models.gpt import ATTENTION, GPT, PRESETS, GPTConfig

CKPT_FORMAT, CKPT_VERSION = "fastattn-gpt", 1
CKPT_KEYS = ("step", "config", "model", "optimizer", "rng", "sampler", "tokenizer")

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
    approximate=None, checkpointing=None, batch_size=16, grad_accum=1, max_steps=1000,
    lr=1e-3, min_lr=1e-4, warmup_steps=100, weight_decay=0.1, beta1=0.9, beta2=0.95,
    grad_clip=1.0, device="auto", dtype="auto", compile=False, fsdp=False, seed=0,
    peak_tflops=None, out_dir=None, eval_interval=250, eval_iters=20, log_interval=10,
    ckpt_interval=None, keep_checkpoints=False, resume=None, sink_threshold=0.5,
    progress=True, plot=True)
MODEL_FLAGS = ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "mlp_hidden",
               "dropout", "bias", "approximate", "checkpointing", "attention")
SHAPE_FLAGS = ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "mlp_hidden", "bias")
# Peak dense bf16/fp16 tensor-core FLOP/s from the vendors' data sheets, for MFU.
# First match wins (a word of torch.cuda.get_device_name), so variants come first.
SPEC_PEAK_TFLOPS = {"H100 PCIe": 756.5, "H100 NVL": 835.5, "H100": 989.4, "H200": 989.4,
                    "GH200": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0, "L4": 121.0}


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or is not a fastattn GPT checkpoint."""


# ------------------------------------------------------------------- arguments


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


def _plain(args: argparse.Namespace) -> dict:
    """The options as JSON-able values (what checkpoints and config.json store)."""
    return {k: v for k, v in vars(args).items()
            if k in DEFAULTS and (v is None or isinstance(v, (str, int, float, bool)))}


# -------------------------------------------------------------------- schedule


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup from lr/warmup to
    lr over ``warmup_steps``, then a half cosine down to ``min_lr`` at ``max_steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def configure_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                        betas: tuple[float, float], fused: bool) -> torch.optim.AdamW:
    """AdamW with two groups: every tensor of 2+ dims (Linear weights, the token
    embedding — also the tied output head — and the position embedding) decays, as in
    GPT-2 / nanoGPT; biases and LayerNorm gains and shifts (1-D) do not, since shrinking
    them toward 0 only fights the normalisation."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


# ------------------------------------------------------------------ precision


@dataclass
class Precision:
    dtype: torch.dtype
    device_type: str

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype,
                              enabled=self.dtype != torch.float32)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)


def choose_precision(device: torch.device, name: str) -> Precision:
    if name == "auto":
        if device.type != "cuda":
            name = "float32"
        else:
            name = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return Precision(getattr(torch, name), device.type)


# ----------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False          # this process group was started here

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.on:
            torch.distributed.barrier()

    def mean(self, value: Tensor) -> Tensor:
        if self.on:
            value = value.detach().clone()
            torch.distributed.all_reduce(value)
            value /= self.world
        return value

    def gather(self, obj: Any) -> list:
        """``obj`` from every rank, in rank order (on every rank)."""
        if not self.on:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def setup_distributed(device_arg: str) -> tuple[Dist, torch.device]:
    """Join the torchrun process group if there is one; pick this rank's device."""
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), torch.device("cuda" if use_cuda else "cpu")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    owned = not torch.distributed.is_initialized()
    if owned:
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local, owned), device


@contextlib.contextmanager
def _main_first(dist: Dist) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. fills a cache), the others after it."""
    if not dist.main:
        dist.barrier()
    yield
    if dist.main:
        dist.barrier()


# ----------------------------------------------------------------- checkpoints


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``:
    a crash leaves the old checkpoint or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    with contextlib.suppress(OSError):          # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or ``ckpt.pt`` in a run folder."""
    path = Path(path)
    return path / "ckpt.pt" if path.is_dir() else path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by ``save_checkpoint`` (``weights_only``: no code runs).

    Raises FileNotFoundError if it is missing and ``CheckpointError`` if it is corrupt,
    truncated or not a fastattn GPT checkpoint."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or truncated: torch.load "
                              f"failed ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a fastattn GPT checkpoint "
                              f"(no format={CKPT_FORMAT!r} entry)")
    missing = [k for k in CKPT_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {missing}")
    return ckpt


def _rng_state(device: torch.device) -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 fsdp: bool) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts; collective under FSDP."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=opts),
            get_optimizer_state_dict(model, optimizer, options=opts))


def _load_optimizer(model, optimizer, state: dict, fsdp: bool, saved_fsdp: bool) -> None:
    if fsdp != saved_fsdp:
        raise CheckpointError("the checkpoint's optimizer state was saved "
                              f"{'with' if saved_fsdp else 'without'} --fsdp; resume the "
                              "same way")
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )
    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True))


# --------------------------------------------------------------------- logging


class Progress:
    """A tqdm bar on rank 0 (a plain line per log step without tqdm or with --no-progress)."""

    def __init__(self, total: int, initial: int, enabled: bool, bar: bool) -> None:
        self.enabled, self.bar = enabled, None
        if enabled and bar:
            with contextlib.suppress(ImportError):
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.total = total

    def step(self, step: int, metrics: dict | None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if metrics:
                self.bar.set_postfix_str(_format_metrics(metrics), refresh=False)
        elif self.enabled and metrics:
            print(f"step {step}/{self.total} | {_format_metrics(metrics)}", flush=True)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _format_metrics(m: dict) -> str:
    parts = [f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}", f"{m['tokens_per_s']:,.0f} tok/s"]
    if m.get("mfu") is not None:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    return " | ".join(parts)


class JsonLog:
    """``log.jsonl``: one JSON object per line. Resuming drops lines past the resumed
    step (written after the checkpoint by the interrupted run)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if resume_step is None or not path.exists():
            path.write_text("")
        else:
            keep = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, **entry: Any) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")


def read_log(path: str | os.PathLike) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def plot_log(log_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """Loss curves (training batches and evaluations) from ``log.jsonl`` into a PNG.
    Returns None if matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    entries = read_log(log_path)
    train = [(e["step"], e["loss"]) for e in entries if e.get("event") == "train"]
    evals = [e for e in entries if e.get("event") == "eval"]
    fig = Figure(figsize=(7, 4), layout="tight")
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), lw=1, alpha=0.7, label="train (batches since last line)")
    for key, style in (("train_loss", "s--"), ("val_loss", "o-")):
        points = [(e["step"], e[key]) for e in evals if e.get(key) is not None]
        if points:
            ax.plot(*zip(*points), style, ms=4, label=f"{key.split('_')[0]} (evaluation)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(png_path, dpi=120)
    return Path(png_path)


def sink_summary(shares: Tensor, threshold: float, n_sink: int = 1) -> dict:
    """Per-layer mean and max of the (n_layer, n_head) sink shares, and the heads above
    ``threshold`` as [layer, head, share]."""
    shares = shares.float().cpu()
    above = [[int(l), int(h), round(float(shares[l, h]), 4)]
             for l, h in (shares > threshold).nonzero().tolist()]
    return {"n_sink": n_sink, "threshold": threshold,
            "layer_mean": [round(v, 4) for v in shares.mean(1).tolist()],
            "layer_max": [round(v, 4) for v in shares.max(1).values.tolist()],
            "heads_above": above, "shares": [[round(v, 4) for v in row]
                                             for row in shares.tolist()]}


def format_sink(s: dict) -> str:
    layers = "  ".join(f"L{i} {m:.2f}/{x:.2f}"
                       for i, (m, x) in enumerate(zip(s["layer_mean"], s["layer_max"])))
    heads = ", ".join(f"L{l}.H{h} {v:.2f}" for l, h, v in s["heads_above"]) or "none"
    return (f"  sink share on token 0, mean/max over heads: {layers}\n"
            f"  heads above {s['threshold']:g}: {heads}")


def peak_flops(device: torch.device, precision: Precision, given_tflops: float | None
               ) -> tuple[float, str]:
    """Peak FLOP/s for MFU and where it comes from."""
    if given_tflops:
        return given_tflops * 1e12, "--peak-tflops"
    if device.type == "cuda" and precision.dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        for key, tflops in SPEC_PEAK_TFLOPS.items():
            if re.search(rf"\b{key}\b", name):
                return tflops * 1e12, f"{name} data sheet, dense {precision.dtype}"
    from fastattn.benchmark import measure_peak_tflops
    measured = measure_peak_tflops(device, precision.dtype, quick=device.type == "cpu")
    return measured["tflops"] * 1e12, f"measured: {measured['how']}"


# ---------------------------------------------------------------------- training


@dataclass
class Run:
    """Everything the loop needs, built by ``_build``."""
    args: argparse.Namespace
    dist: Dist
    device: torch.device
    precision: Precision
    raw: GPT                         # the model (possibly sharded), never compiled/wrapped
    model: torch.nn.Module           # what the loop calls: DDP / compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    tokenizer: Any
    data: D.TokenData
    sampler: D.BatchSampler
    step: int
    out_dir: Path


def train(args: argparse.Namespace) -> dict:
    """Train as ``args`` says (see ``add_train_arguments``). Returns a summary: final
    ``step``, last ``loss`` and ``val_loss``, ``checkpoint``, ``log`` and ``plot`` paths,
    the trained ``model`` (the unwrapped GPT) and this rank's ``sampler`` state."""
    dist, device = setup_distributed(getattr(args, "device", None) or "auto")
    try:
        run = _build(args, dist, device)
        return _loop(run)
    finally:
        if dist.owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _build(args: argparse.Namespace, dist: Dist, device: torch.device) -> Run:
    ckpt = None
    if args.resume is not None:
        out_dir = args.out_dir or os.path.join("runs", args.preset or DEFAULTS["preset"])
        where = checkpoint_path(out_dir if args.resume == "auto" else args.resume)
        ckpt = load_checkpoint(where)
        # Without --out-dir, a resumed run goes on in the checkpoint's folder.
        args = argparse.Namespace(**{**vars(args), "out_dir": args.out_dir or str(where.parent)})
    args = resolve_args(args, ckpt.get("args") if ckpt else None)
    precision = choose_precision(device, args.dtype)
    files = D.text_files(args.data)
    with _main_first(dist):
        tokenizer = _tokenizer(args, files, ckpt)
        data = D.prepare(files, tokenizer, args.cache_dir, args.val_fraction)
    config = _model_config(args, tokenizer, ckpt)

    torch.manual_seed(args.seed)                       # same init on every rank
    raw = GPT(config).to(device)
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
    model = _parallelize(raw, args.fsdp, dist, device)
    fused = device.type == "cuda" and not (args.fsdp and dist.on)
    optimizer = configure_optimizer(raw, args.lr, args.weight_decay, (args.beta1, args.beta2),
                                    fused)
    scaler = precision.scaler()
    sampler = D.BatchSampler(data.train, args.batch_size, config.block_size,
                             seed=[args.seed, dist.rank], split="train")
    if args.val_fraction > 0:                          # fail now if val is too short
        D.BatchSampler(data.val, 1, config.block_size, split="val")
    torch.manual_seed(args.seed + 1 + dist.rank)       # each rank its own dropout masks
    step = 0
    if ckpt is not None:
        step = _restore(ckpt, raw, optimizer, scaler, sampler, args, dist, device)
    if args.compile:
        model = torch.compile(model)
    return Run(args, dist, device, precision, raw, model, optimizer, scaler, tokenizer, data,
               sampler, step, Path(args.out_dir))


def _parallelize(raw: GPT, fsdp: bool, dist: Dist, device: torch.device) -> torch.nn.Module:
    """Under torchrun: shard ``raw`` in place with FSDP2 (each block, then the root,
    which holds the embeddings and the tied head) and return it, or wrap it in DDP."""
    if not dist.on:
        return raw
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in raw.blocks:
            fully_shard(block)
        return fully_shard(raw)
    return torch.nn.parallel.DistributedDataParallel(
        raw, device_ids=[device.index] if device.type == "cuda" else None)


def _tokenizer(args, files, ckpt):
    if ckpt is not None:
        return D.tokenizer_from_spec(ckpt["tokenizer"])
    if args.tokenizer == "byte":
        if args.vocab_size is not None:
            raise ValueError("--vocab-size applies to --tokenizer bpe; the byte tokenizer's "
                             "vocabulary is 256")
        return D.ByteTokenizer()
    preset_vocab = PRESETS[args.preset].get("vocab_size", 256)
    vocab = args.vocab_size or (preset_vocab if preset_vocab > 256 else 4096)
    return D.load_or_train_bpe(files, vocab, args.cache_dir)


def _model_config(args, tokenizer, ckpt) -> GPTConfig:
    overrides = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    if ckpt is not None:
        saved = GPTConfig(**ckpt["config"])
        for k in SHAPE_FLAGS:
            if k in overrides and overrides[k] != getattr(saved, k):
                raise ValueError(f"--{k.replace('_', '-')} {overrides[k]} differs from the "
                                 f"checkpoint's {getattr(saved, k)}: the model's shape cannot "
                                 "change on resume")
        return GPTConfig(**{**saved.to_dict(), **overrides})
    # Round a BPE vocabulary up to a multiple of 64 (tensor-core friendly); the extra
    # rows are never targets and learn to stay unlikely.
    vocab = tokenizer.vocab_size if tokenizer.vocab_size <= 256 else \
        -(-tokenizer.vocab_size // 64) * 64
    return GPTConfig.from_preset(args.preset, vocab_size=vocab, **overrides)


def _restore(ckpt, raw, optimizer, scaler, sampler, args, dist, device) -> int:
    _load_optimizer(raw, optimizer, ckpt["optimizer"], args.fsdp and dist.on,
                    ckpt.get("fsdp", False))
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["sampler"]) == dist.world:
        sampler.load_state_dict(ckpt["sampler"][dist.rank])
        _set_rng_state(ckpt["rng"][dist.rank], device)
    elif dist.main:
        print(f"note: the checkpoint was written by {len(ckpt['sampler'])} ranks, this run "
              f"has {dist.world}: batches and dropout masks restart from fresh seeds",
              file=sys.stderr)
    return int(ckpt["step"])


def _loop(run: Run) -> dict:
    args, dist, raw = run.args, run.dist, run.raw
    run.out_dir.mkdir(parents=True, exist_ok=True)
    if dist.main:
        _write_run_files(run)
    log = JsonLog(run.out_dir / "log.jsonl", dist.main,
                  run.step if args.resume is not None else None)
    peak, peak_how = peak_flops(run.device, run.precision, args.peak_tflops) \
        if dist.main else (0.0, "")
    tokens_per_step = args.batch_size * raw.config.block_size * args.grad_accum * dist.world
    if dist.main:
        print(f"GPT {raw.config.attention}: {raw.num_params() / 1e6:.2f}M non-embedding "
              f"parameters, {tokens_per_step:,} tokens/step, {run.precision.dtype} on "
              f"{run.device}" + (f" × {dist.world} ranks" if dist.on else "") +
              f"; {len(run.data.train):,} train tokens; MFU against {peak / 1e12:.1f} "
              f"TFLOP/s ({peak_how})", flush=True)
    log.write(event="start", step=run.step, config=raw.config.to_dict(), args=_plain(args),
              world_size=dist.world, device=str(run.device), peak_flops=peak)
    progress = Progress(args.max_steps, run.step, dist.main, args.progress)
    summary: dict[str, Any] = {"loss": None, "val_loss": None}
    meter = Throughput(tokens_per_step)
    loss_sum = None
    try:
        while run.step < args.max_steps:
            lr = lr_at(run.step, args.lr, args.min_lr, args.warmup_steps, args.max_steps)
            loss, grad_norm = _train_step(run, lr)
            run.step += 1
            meter.steps += 1
            loss_sum = loss if loss_sum is None else loss_sum + loss
            last = run.step == args.max_steps
            metrics = None
            if run.step % args.log_interval == 0 or last:
                # Mean over the steps since the last line and over ranks; .item() syncs.
                mean_loss = dist.mean(loss_sum / meter.steps).item()
                metrics = {"loss": mean_loss, "lr": lr, "tokens_per_s": meter.rate()}
                loss_sum = None
                metrics["mfu"] = raw.estimate_mfu(metrics["tokens_per_s"] / dist.world,
                                                  peak) if peak else None
                log.write(event="train", step=run.step, grad_norm=_scalar(grad_norm),
                          **metrics)
                summary["loss"] = metrics["loss"]
            progress.step(run.step, metrics)
            with meter.paused():                         # evaluation is not training time
                if run.step % args.eval_interval == 0 or last:
                    ev = evaluate(run)
                    summary["val_loss"] = ev.get("val_loss")
                    log.write(event="eval", step=run.step, **ev)
                    progress.write(_format_eval(run.step, ev))
                if run.step % args.ckpt_interval == 0 or last:
                    _checkpoint(run, summary["val_loss"])
    finally:
        progress.close()
    png = plot_log(log.path, run.out_dir / "loss.png") if dist.main and args.plot else None
    return {**summary, "step": run.step, "checkpoint": run.out_dir / "ckpt.pt",
            "log": log.path, "plot": png, "model": raw, "sampler": run.sampler.state_dict()}


class Throughput:
    """Tokens per second of training since the last ``rate()``, pauses excluded."""

    def __init__(self, tokens_per_step: int) -> None:
        self.tokens_per_step, self.steps = tokens_per_step, 0
        self.start, self.excluded = time.perf_counter(), 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t0

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.tokens_per_step * self.steps / max(now - self.start - self.excluded, 1e-9)
        self.start, self.excluded, self.steps = now, 0.0, 0
        return rate


def _scalar(t: Tensor | None) -> float | None:
    """A (possibly DTensor) scalar as a float; collective under FSDP."""
    if t is None:
        return None
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


def _train_step(run: Run, lr: float) -> tuple[Tensor, Tensor | None]:
    """One optimizer step over ``grad_accum`` micro-batches. Returns the mean loss and the
    gradient norm before clipping (None without clipping), as tensors: no device sync."""
    args, model = run.args, run.model
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    total = torch.zeros((), device=run.device)
    for micro in range(args.grad_accum):
        x, y = run.sampler.next(run.device)
        with _sync_grads(run, micro == args.grad_accum - 1), run.precision.autocast():
            _, loss = model(x, y)
            loss = loss / args.grad_accum
        run.scaler.scale(loss).backward()
        total += loss.detach()
    grad_norm = None
    if args.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.raw.parameters(), args.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return total, grad_norm


def _sync_grads(run: Run, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if sync or not run.dist.on:
        return contextlib.nullcontext()
    if run.args.fsdp:
        return _fsdp_no_sync(run.raw)
    ddp = run.model._orig_mod if hasattr(run.model, "_orig_mod") else run.model
    return ddp.no_sync()


@contextlib.contextmanager
def _fsdp_no_sync(model) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@contextlib.contextmanager
def _unsharded(run: Run) -> Iterator[None]:
    """Under FSDP, gather every shard so modules can be called outside their forward."""
    if not (run.args.fsdp and run.dist.on):
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    mods = [m for m in run.raw.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()


@torch.no_grad()
def evaluate(run: Run) -> dict:
    """Mean loss over ``eval_iters`` fixed batches of each split (the same batches at
    every evaluation, averaged over ranks) and the attention-sink shares of one val
    batch. Uses no global RNG, so training continues exactly as without it."""
    args, bs = run.args, run.raw.config.block_size
    run.model.eval()
    out: dict[str, Any] = {}
    splits = ["train", "val"] if args.val_fraction > 0 else ["train"]
    for i, split in enumerate(splits):
        sampler = D.BatchSampler(run.data.split(split), args.batch_size, bs,
                                 seed=[args.seed, run.dist.rank, 1000 + i], split=split)
        total = torch.zeros((), device=run.device)
        for _ in range(args.eval_iters):
            x, y = sampler.next(run.device)
            with run.precision.autocast():
                total += run.model(x, y)[1].float()
        out[f"{split}_loss"] = run.dist.mean(total / args.eval_iters).item()
    x, _ = D.BatchSampler(run.data.split(splits[-1]), min(args.batch_size, 8), bs,
                          seed=[args.seed, 2000]).next(run.device)
    with run.precision.autocast(), _unsharded(run):
        shares = run.raw.sink_shares(x)
    out["sink"] = sink_summary(shares, args.sink_threshold)
    run.model.train()
    return out


def _format_eval(step: int, ev: dict) -> str:
    losses = ", ".join(f"{k.removesuffix('_loss')} {v:.4f}" for k, v in ev.items()
                       if k.endswith("_loss"))
    return f"step {step}: loss {losses}\n{format_sink(ev['sink'])}"


def _checkpoint(run: Run, val_loss: float | None) -> None:
    dist, args = run.dist, run.args
    model_sd, optim_sd = _state_dicts(run.raw, run.optimizer, args.fsdp and dist.on)
    rng = dist.gather(_rng_state(run.device))
    samplers = dist.gather(run.sampler.state_dict())
    if not dist.main:
        return
    state = {"format": CKPT_FORMAT, "version": CKPT_VERSION, "step": run.step,
             "config": run.raw.config.to_dict(), "model": model_sd, "optimizer": optim_sd,
             "fsdp": bool(args.fsdp and dist.on),
             "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
             "rng": rng, "sampler": samplers, "world_size": dist.world,
             "tokenizer": run.tokenizer.spec(), "args": _plain(args), "val_loss": val_loss}
    path = save_checkpoint(state, run.out_dir / "ckpt.pt")
    if args.keep_checkpoints:
        keep = run.out_dir / f"ckpt-{run.step:07d}.pt"
        with contextlib.suppress(FileNotFoundError):
            keep.unlink()
        try:
            os.link(path, keep)
        except OSError:
            save_checkpoint(state, keep)


def _write_run_files(run: Run) -> None:
    info = {"config": run.raw.config.to_dict(), "args": _plain(run.args),
            "world_size": run.dist.world}
    (run.out_dir / "config.json").write_text(json.dumps(info, indent=1) + "\n")
    if isinstance(run.tokenizer, D.BPETokenizer):
        run.tokenizer.save(run.out_dir / "tokenizer.json")


def train_main(args: argparse.Namespace) -> int:
    """Entry point for ``fastattn train``: train, print where the results are. Returns
    the exit status (2 for bad arguments, data or checkpoints, with the message)."""
    try:
        result = train(args)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"fastattn train: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: step {result['step']}"
              + (f", loss {result['loss']:.4f}" if result["loss"] is not None else "")
              + (f", val loss {result['val_loss']:.4f}" if result["val_loss"] else "")
              + f"; checkpoint {result['checkpoint']}, log {result['log']}"
              + (f", plot {result['plot']}" if result["plot"] else ""))
    return 0


# ---------------------------------------------------------------------- sampling


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    """Register the options of ``fastattn sample`` / ``python -m fastattn.sample``."""
    p.add_argument("--checkpoint", "-c", default=os.path.join("runs", "tiny"),
                   help="checkpoint file or run folder (default runs/tiny)")
    p.add_argument("--prompt", default="", help="text to continue (default: a newline, or "
                                                "<|endoftext|> for BPE)")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, help="nucleus: smallest set with probability >= p")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="CTRL penalty for tokens already present, > 1 discourages (1 = off)")
    p.add_argument("--seed", type=int, help="make sampling reproducible")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   default="auto", help="autocast dtype (auto: bf16/fp16 on GPU, fp32 on CPU)")
    p.add_argument("--attention", choices=ATTENTION,
                   help="run the weights in the fast or the naive model (default: as trained)")
    p.add_argument("--no-cache", dest="use_cache", action="store_false",
                   help="recompute the whole context every token instead of a KV cache")


def load_model(checkpoint: str | os.PathLike, device: torch.device | str = "cpu",
               attention: str | None = None) -> tuple[GPT, Any, dict]:
    """The GPT of a checkpoint (eval mode), its tokenizer and the checkpoint dict."""
    ckpt = load_checkpoint(checkpoint)
    config = ckpt["config"] | ({"attention": attention} if attention else {})
    model = GPT(GPTConfig(**config))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), D.tokenizer_from_spec(ckpt["tokenizer"]), ckpt


def sample(args: argparse.Namespace) -> list[str]:
    """Generate ``num_samples`` continuations of the prompt; returns the decoded texts
    (prompt included)."""
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    device = torch.device("cuda" if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()) else "cpu")
    model, tok, _ = load_model(args.checkpoint, device, args.attention)
    prompt = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
    ids = list(tok.encode(prompt)) if prompt else [tok.eot if tok.eot is not None else 10]
    idx = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
    with choose_precision(device, args.dtype).autocast():
        out = model.generate(idx, args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p,
                             repetition_penalty=args.repetition_penalty, eos=tok.eot,
                             seed=args.seed, use_cache=args.use_cache)
    return [tok.decode(row.tolist()) for row in out]


def sample_main(args: argparse.Namespace) -> int:
    """Entry point for ``fastattn sample``: print the samples, separated by rules."""
    try:
        texts = sample(args)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"fastattn sample: error: {e}", file=sys.stderr)
        return 2
    for i, text in enumerate(texts):
        if i:
            print("\n" + "-" * 72)
        print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    return train_main(parse_train_args(argv))


__all__ = ["CheckpointError", "add_sample_arguments", "add_train_arguments",
           "configure_optimizer", "load_checkpoint", "load_model", "lr_at", "sample",
           "sample_main", "save_checkpoint", "train", "train_main"]

if __name__ == "__main__":
    sys.exit(main())
