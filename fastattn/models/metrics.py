"""What a training run reports: the progress bar, ``log.jsonl``, the loss plot,
throughput and MFU, and the attention-sink summary of each evaluation."""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastattn.models.optim import Precision

# Peak dense bf16/fp16 tensor-core FLOP/s from the vendors' data sheets, for MFU.
# First match wins (a word of torch.cuda.get_device_name), so variants come first.
SPEC_PEAK_TFLOPS = {"H100 PCIe": 756.5, "H100 NVL": 835.5, "H100": 989.4, "H200": 989.4,
                    "GH200": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0, "L4": 121.0}


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
    return _measured_matmul_flops(device, precision.dtype)


def _measured_matmul_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """FLOP/s of the best timed block of n×n matmuls (n = 8192 on CUDA, 1024 on CPU),
    for devices without a data-sheet entry. A quick estimate for a run's MFU; the
    benchmarks measure peaks with their own harness."""
    from torch.utils.benchmark import Timer
    n = 8192 if device.type == "cuda" else 1024
    g = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=g, device=device, dtype=dtype) for _ in range(2))
    # Timer defaults to one thread; the run uses torch's thread count.
    timer = Timer("a @ b", globals={"a": a, "b": b}, num_threads=torch.get_num_threads())
    best_s = min(timer.blocked_autorange(min_run_time=0.2).times)
    name = str(dtype).removeprefix("torch.")
    how = f"measured: {n}x{n} @ {n}x{n} matmul in {name}, best timed block"
    return 2 * n ** 3 / best_s, how


__all__ = ["JsonLog", "Progress", "Throughput", "format_sink", "peak_flops", "plot_log",
           "read_log", "sink_summary"]
