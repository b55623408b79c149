"""Host overhead per call: each fastattn function against torch's own, on tensors so
small that the kernels cost next to nothing, so the time is what the call costs on the
host (validation, backend choice, dispatch, autograd bookkeeping).

    fastattn bench --op overhead [--quick] [--save [DIR]]

Per call (layer_norm, rms_norm, gelu, bias_gelu, attention) and mode — ``fwd`` (under
``torch.no_grad()``) and ``fwd+bwd`` (forward with autograd, then ``backward`` of a fixed
gradient) — both sides run in one process, interleaved: each round times a batch of
torch calls, then a batch of fastattn calls; a side's time is the minimum over rounds
of its per-call time (the least disturbed round: the host cost without the noise of
other work on the machine). On CPU the clock is the thread's CPU time
(``time.thread_time``: time spent waiting for a core shared with other processes does
not count); on CUDA wall time with a synchronize around each batch. ``ratio`` = fastattn / torch; ``limit`` is issue 14's bound
(3× forward, 2× forward+backward). Saved as ``benchmarks/results/<device>/overhead.json``.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fastattn
from fastattn.tools.bench.provenance import load_average, provenance
from fastattn.tools.bench.results import save

LIMITS = {"fwd": 3.0, "fwd+bwd": 2.0}
MODES = tuple(LIMITS)
ROWS, WIDTH = 4, 16                  # row-wise ops: (2, ROWS // 2, WIDTH)
ATTENTION = (1, 2, 8, 16)            # (B, H, T, D)


def _rowwise(device: torch.device, g: torch.Generator) -> list[torch.Tensor]:
    x = torch.randn(2, ROWS // 2, WIDTH, generator=g).to(device)
    w, b = (torch.randn(WIDTH, generator=g).to(device) for _ in range(2))
    return [x, w, b]


def _qkv(device: torch.device, g: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(*ATTENTION, generator=g).to(device) for _ in range(3)]


# name -> (inputs, torch's call, fastattn's call): the same math on both sides.
CALLS: dict[str, tuple[Callable, Callable, Callable]] = {
    "layer_norm": (_rowwise, lambda x, w, b: F.layer_norm(x, (WIDTH,), w, b),
                   lambda x, w, b: fastattn.layer_norm(x, (WIDTH,), w, b)),
    "rms_norm": (_rowwise, lambda x, w, b: F.rms_norm(x, (WIDTH,), w, 1e-6),
                 lambda x, w, b: fastattn.rms_norm(x, (WIDTH,), w, 1e-6)),
    "gelu": (_rowwise, lambda x, w, b: F.gelu(x), lambda x, w, b: fastattn.gelu(x)),
    "bias_gelu": (_rowwise, lambda x, w, b: F.gelu(x + b),
                  lambda x, w, b: fastattn.bias_gelu(x, b)),
    "attention": (_qkv, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                  lambda q, k, v: fastattn.flash_attention(q, k, v, causal=True)),
}


def _runner(fn: Callable, inputs: list[torch.Tensor], mode: str, batch: int
            ) -> Callable[[], None]:
    """A function that makes ``batch`` calls of ``fn`` in ``mode``."""
    if mode == "fwd":
        def run() -> None:
            with torch.no_grad():
                for _ in range(batch):
                    fn(*inputs)
        return run
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    grad = torch.ones_like(fn(*leaves))

    def run_bwd() -> None:
        for _ in range(batch):
            fn(*leaves).backward(grad)
    return run_bwd


def measure_call(name: str, mode: str, device: torch.device, rounds: int, batch: int
                 ) -> dict:
    """One row: per-call µs of torch and of fastattn (min over ``rounds`` interleaved
    rounds of ``batch`` calls each), their ratio and the limit."""
    make, torch_fn, fast_fn = CALLS[name]
    inputs = make(device, torch.Generator().manual_seed(0))
    with torch.no_grad():                       # the same result, checked once
        torch.testing.assert_close(fast_fn(*inputs), torch_fn(*inputs), atol=1e-5, rtol=1e-5)
    sides = {"torch": _runner(torch_fn, inputs, mode, batch),
             "fastattn": _runner(fast_fn, inputs, mode, batch)}
    best = dict.fromkeys(sides, float("inf"))
    for run in sides.values():
        run()                                   # warm-up
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    for _ in range(rounds):
        for side, run in sides.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = clock()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[side] = min(best[side], (clock() - t0) / batch * 1e6)
    ratio = best["fastattn"] / best["torch"]
    shape = list(inputs[0].shape)
    return {"call": name, "mode": mode, "shape": shape, "torch_us": best["torch"],
            "fastattn_us": best["fastattn"], "ratio": ratio, "limit": LIMITS[mode],
            "within_limit": ratio <= LIMITS[mode]}


def run_overhead(device: str = "cpu", quick: bool = False, threads: int | None = 1,
                 calls: list[str] | None = None) -> dict:
    """Measure every call in both modes; the results document. ``threads``: torch's CPU
    threads (default 1, so no thread pool wakes up for a tiny tensor)."""
    load = load_average()
    if threads:
        torch.set_num_threads(threads)
    rounds, batch = (3, 10) if quick else (300, 20)
    dev = torch.device(device)
    rows = [measure_call(name, mode, dev, rounds, batch)
            for name in (calls or CALLS) for mode in MODES]
    prov = provenance(device, "float32", torch.get_num_threads(), load)
    clock = "perf_counter" if device == "cuda" else "thread_time"
    return {"schema": 1, "op": "overhead", "unit": "µs per call",
            "config": {"rounds": rounds, "batch": batch, "quick": quick, "clock": clock},
            "provenance": prov, "rows": rows}


def format_table(doc: dict) -> str:
    """Markdown table of a results document."""
    lines = ["| call | mode | shape | torch µs | fastattn µs | fastattn / torch | limit |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in doc["rows"]:
        mark = "" if r["within_limit"] else " ✗"
        lines.append(f"| {r['call']} | {r['mode']} | {tuple(r['shape'])} | "
                     f"{r['torch_us']:.1f} | {r['fastattn_us']:.1f} | {r['ratio']:.2f}×{mark} | "
                     f"{r['limit']:.0f}× |")
    return "\n".join(lines)


def readme_block(doc: dict) -> str:
    prov, cfg = doc["provenance"], doc["config"]
    caption = (f"Host time per call on tiny tensors ({cfg['clock']}), min over "
               f"{cfg['rounds']} interleaved rounds of {cfg['batch']} calls; "
               f"{prov['threads']} thread(s), torch "
               f"{prov['torch']}, {prov['date'][:10]}.")
    return f"{caption}\n\n{format_table(doc)}"


def bench_and_report(command: str, device: str | None, quick: bool, save_dir: str | None
                     ) -> int:
    """What ``fastattn bench --op overhead`` runs: measure, print, save (``save_dir``
    not None; "" = the default folder). Exit status 1 if a ratio passes its limit."""
    start = time.perf_counter()
    doc = run_overhead(device or "cpu", quick)
    doc["provenance"]["command"] = command
    print(readme_block(doc))
    if save_dir is not None:
        print(f"\nsaved {save(doc, save_dir or None)[0]}")
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    return 0 if all(r["within_limit"] for r in doc["rows"]) else 1
