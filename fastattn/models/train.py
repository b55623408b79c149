"""Train a GPT on text files.

    python -m fastattn.train --preset tiny --max-steps 50        # CPU, seconds
    python -m fastattn.train --preset small --data my_texts/ --tokenizer bpe
    torchrun --nproc-per-node 8 -m fastattn.train --preset gpt2   # DDP (--fsdp to shard)
    python -m fastattn.train --resume --out-dir runs/tiny          # continue exactly
    python -m fastattn.sample --checkpoint runs/tiny --prompt "def "

The loop: AdamW (fused on CUDA) with weight decay on matrices and embeddings only,
linear warmup then cosine decay of the learning rate, gradient accumulation, gradient
clipping, mixed precision (bf16 autocast on GPUs that have it, fp16 with a GradScaler on
the others, fp32 on CPU), optional ``torch.compile`` (``optim.py``; each step is
``optim.train_step``). Every ``--eval-interval`` steps: the mean loss on
``--eval-iters`` fixed train and val batches, and each layer's attention-sink share
(``GPT.sink_shares``). Output in ``--out-dir``: ``log.jsonl`` (one JSON object per log
line), ``ckpt.pt``, ``config.json``, ``tokenizer.json`` (BPE) and ``loss.png``
(``metrics.py``).

Checkpoints (``checkpoint.py``) are written atomically and hold the model, optimizer,
scaler, step, every rank's RNG states and batch-sampler state, the config, tokenizer and
arguments: ``--resume`` continues with the same batches and dropout masks, so a resumed
run repeats the uninterrupted one.

Under ``torchrun`` (``distributed.py``) the model is wrapped in DistributedDataParallel
(``--fsdp``: sharded with FSDP2's ``fully_shard``); each rank draws its own batches
(sampler seeded with ``[seed, rank]``); only rank 0 prints, logs and writes files.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastattn.models import checkpoint as C
from fastattn.models import data as D
from fastattn.models import distributed as dd
from fastattn.models.gpt import GPT, PRESETS, GPTConfig
from fastattn.models.metrics import (JsonLog, Progress, Throughput, format_sink, peak_flops,
                                     plot_log, sink_summary)
from fastattn.models.optim import (Precision, choose_precision, configure_optimizer, lr_at,
                                   train_step)
from fastattn.models.train_config import (DEFAULTS, MODEL_FLAGS, SHAPE_FLAGS,
                                          parse_train_args, plain_args, resolve_args)


@dataclass
class Run:
    """Everything the loop needs, built by ``_build``."""
    args: argparse.Namespace
    dist: dd.Dist
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

    @property
    def fsdp(self) -> bool:
        return bool(self.args.fsdp and self.dist.on)


def train(args: argparse.Namespace) -> dict:
    """Train as ``args`` says (see ``add_train_arguments``). Returns a summary: final
    ``step``, last ``loss`` and ``val_loss``, ``checkpoint``, ``log`` and ``plot`` paths,
    the trained ``model`` (the unwrapped GPT) and this rank's ``sampler`` state."""
    dist, device = dd.setup_distributed(getattr(args, "device", None) or "auto")
    try:
        run = _build(args, dist, device)
        return _loop(run)
    finally:
        if dist.owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ------------------------------------------------------------------- building


def _build(args: argparse.Namespace, dist: dd.Dist, device: torch.device) -> Run:
    ckpt = None
    if args.resume is not None:
        out_dir = args.out_dir or os.path.join("runs", args.preset or DEFAULTS["preset"])
        where = C.checkpoint_path(out_dir if args.resume == "auto" else args.resume)
        ckpt = C.load_checkpoint(where)
        # Without --out-dir, a resumed run goes on in the checkpoint's folder.
        args = argparse.Namespace(**{**vars(args), "out_dir": args.out_dir or str(where.parent)})
    args = resolve_args(args, ckpt.get("args") if ckpt else None)
    precision = choose_precision(device, args.dtype)
    files = D.text_files(args.data)
    with dd.main_first(dist):
        tokenizer = _tokenizer(args, files, ckpt)
        data = D.prepare(files, tokenizer, args.cache_dir, args.val_fraction)
    config = _model_config(args, tokenizer, ckpt)

    torch.manual_seed(args.seed)                       # same init on every rank
    raw = GPT(config).to(device)
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
    model = dd.parallelize(raw, args.fsdp, dist, device)
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
    C.load_optimizer(raw, optimizer, ckpt["optimizer"], args.fsdp and dist.on,
                     ckpt.get("fsdp", False))
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["sampler"]) == dist.world:
        sampler.load_state_dict(ckpt["sampler"][dist.rank])
        C.set_rng_state(ckpt["rng"][dist.rank], device)
    elif dist.main:
        print(f"note: the checkpoint was written by {len(ckpt['sampler'])} ranks, this run "
              f"has {dist.world}: batches and dropout masks restart from fresh seeds",
              file=sys.stderr)
    return int(ckpt["step"])


# ----------------------------------------------------------------------- loop


def _loop(run: Run) -> dict:
    args, dist = run.args, run.dist
    log, peak, tokens_per_step = _start(run)
    progress = Progress(args.max_steps, run.step, dist.main, args.progress)
    summary: dict[str, Any] = {"loss": None, "val_loss": None}
    meter = Throughput(tokens_per_step)
    no_sync = dd.no_sync(run.model, run.raw, args.fsdp, dist)
    loss_sum = None
    try:
        while run.step < args.max_steps:
            lr = lr_at(run.step, args.lr, args.min_lr, args.warmup_steps, args.max_steps)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm = train_step(
                run.model, run.optimizer, run.scaler, run.precision,
                lambda: run.sampler.next(run.device), grad_accum=args.grad_accum,
                grad_clip=args.grad_clip, no_sync=no_sync)
            run.step += 1
            meter.steps += 1
            loss_sum = loss if loss_sum is None else loss_sum + loss
            last = run.step == args.max_steps
            metrics = None
            if run.step % args.log_interval == 0 or last:
                metrics = _train_metrics(run, loss_sum, meter, lr, peak)
                log.write(event="train", step=run.step, grad_norm=_scalar(grad_norm),
                          **metrics)
                summary["loss"], loss_sum = metrics["loss"], None
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
            "log": log.path, "plot": png, "model": run.raw, "sampler": run.sampler.state_dict()}


def _start(run: Run) -> tuple[JsonLog, float, int]:
    """Write the run files, open the log, say what runs; the log, peak FLOP/s (rank 0
    only, for MFU) and tokens per step."""
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
    log.write(event="start", step=run.step, config=raw.config.to_dict(),
              args=plain_args(args), world_size=dist.world, device=str(run.device),
              peak_flops=peak)
    return log, peak, tokens_per_step


def _train_metrics(run: Run, loss_sum: Tensor, meter: Throughput, lr: float,
                   peak: float) -> dict:
    # Mean over the steps since the last line and over ranks; .item() syncs.
    loss = run.dist.mean(loss_sum / meter.steps).item()
    tokens_per_s = meter.rate()
    mfu = run.raw.estimate_mfu(tokens_per_s / run.dist.world, peak) if peak else None
    return {"loss": loss, "lr": lr, "tokens_per_s": tokens_per_s, "mfu": mfu}


def _scalar(t: Tensor | None) -> float | None:
    """A (possibly DTensor) scalar as a float; collective under FSDP."""
    if t is None:
        return None
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


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
    with run.precision.autocast(), dd.unsharded(run.raw, run.fsdp):
        shares = run.raw.sink_shares(x)
    out["sink"] = sink_summary(shares, args.sink_threshold)
    run.model.train()
    return out


def _format_eval(step: int, ev: dict) -> str:
    losses = ", ".join(f"{k.removesuffix('_loss')} {v:.4f}" for k, v in ev.items()
                       if k.endswith("_loss"))
    return f"step {step}: loss {losses}\n{format_sink(ev['sink'])}"


# ----------------------------------------------------------------- run files


def _checkpoint(run: Run, val_loss: float | None) -> None:
    dist, args = run.dist, run.args
    model_sd, optim_sd = C.full_state_dicts(run.raw, run.optimizer, run.fsdp)
    rng = dist.gather(C.rng_state(run.device))
    samplers = dist.gather(run.sampler.state_dict())
    if not dist.main:
        return
    state = {"format": C.CKPT_FORMAT, "version": C.CKPT_VERSION, "step": run.step,
             "config": run.raw.config.to_dict(), "model": model_sd, "optimizer": optim_sd,
             "fsdp": run.fsdp,
             "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
             "rng": rng, "sampler": samplers, "world_size": dist.world,
             "tokenizer": run.tokenizer.spec(), "args": plain_args(args),
             "val_loss": val_loss}
    path = C.save_checkpoint(state, run.out_dir / "ckpt.pt")
    if args.keep_checkpoints:
        keep = run.out_dir / f"ckpt-{run.step:07d}.pt"
        with contextlib.suppress(FileNotFoundError):
            keep.unlink()
        try:
            os.link(path, keep)
        except OSError:
            C.save_checkpoint(state, keep)


def _write_run_files(run: Run) -> None:
    info = {"config": run.raw.config.to_dict(), "args": plain_args(run.args),
            "world_size": run.dist.world}
    (run.out_dir / "config.json").write_text(json.dumps(info, indent=1) + "\n")
    if isinstance(run.tokenizer, D.BPETokenizer):
        run.tokenizer.save(run.out_dir / "tokenizer.json")


# ------------------------------------------------------------------ commands


def train_main(args: argparse.Namespace) -> int:
    """Entry point for ``fastattn train``: train, print where the results are. Returns
    the exit status (2 for bad arguments, data or checkpoints, with the message)."""
    try:
        result = train(args)
    except (ValueError, FileNotFoundError, C.CheckpointError) as e:
        print(f"fastattn train: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: step {result['step']}"
              + (f", loss {result['loss']:.4f}" if result["loss"] is not None else "")
              + (f", val loss {result['val_loss']:.4f}" if result["val_loss"] else "")
              + f"; checkpoint {result['checkpoint']}, log {result['log']}"
              + (f", plot {result['plot']}" if result["plot"] else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fastattn.train``: parse ``argv`` and train."""
    return train_main(parse_train_args(argv))


__all__ = ["Run", "evaluate", "main", "train", "train_main"]

if __name__ == "__main__":
    sys.exit(main())
