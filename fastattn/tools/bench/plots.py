"""Plots of the results documents (``report`` renders their tables). Each function
raises ImportError without matplotlib; ``plot`` picks the one a document needs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fastattn.ops.registry import MODES
from fastattn.tools.bench.report import kind, sweep_rows

SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _figure(rows: int, cols: int, width: float = 11.0, height: float = 3.8) -> tuple[Any, Any]:
    from matplotlib.figure import Figure   # no pyplot: no global state, no GUI backend
    fig = Figure(figsize=(width, height * rows), layout="tight")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig: Any, title: str, path: Path) -> None:
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)


def _size_axis(ax: Any, sizes: list[int], xlabel: str, ylabel: str, title: str,
               log_y: bool) -> None:
    """A panel of values against sizes that double: log2 x axis, one tick per size."""
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if log_y:
        ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.grid(True, which="major", alpha=0.3)
    if ax.lines:
        ax.legend()


def _line(ax: Any, points: list[tuple[float, float]], label: str) -> None:
    if points:
        ax.plot(*zip(*points), "o-", label=label)


def plot_run(results: dict, path: Path) -> None:
    """An op run: time and extra memory against size, one line per implementation and
    a row of panels per mode."""
    x, rows = results["x"], [r for r in results["rows"] if r["status"] == "ok"]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)] or list(MODES[:1])
    fig, axes = _figure(len(modes), 2)
    sizes = sorted({r[x] for r in rows})
    for (ax_t, ax_m), mode in zip(axes, modes):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            mine = [r for r in rows if r["impl"] == impl and r["mode"] == mode]
            _line(ax_t, [(r[x], r["time_ms"]["p50"]) for r in mine], impl)
            _line(ax_m, [(r[x], r["extra_mem_mib"]) for r in mine if r.get("extra_mem_mib")],
                  impl)
        for ax, what in ((ax_t, "time (ms, median)"), (ax_m, "extra peak memory (MiB)")):
            _size_axis(ax, sizes, x, what, f"{mode}: {what}", log_y=True)
    prov, cfg = results["provenance"], results["config"]
    dims = ", ".join(f"{k}={v}" for k, v in rows[0]["shape"].items() if k != x) if rows else ""
    _save(fig, f"{results['op']} on {prov['device']}: {cfg['dtype']}, "
               f"{'causal' if cfg['causal'] else 'not causal'}, {dims}; torch "
               f"{prov['torch']}, {prov['date'][:10]}", path)


def plot_sweep(doc: dict, path: Path) -> None:
    """A sweep: speed of each fastattn backend against naive and torch, one pair of bars
    per sweep point, a panel per mode."""
    rows = [r for r in sweep_rows(doc) if r["status"] == "ok"]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)] or list(MODES[:1])
    impls = {r["impl"] for r in rows}

    def label(r: dict) -> str:
        parts = [("causal" if r[a] else "full") if a == "causal" else
                 f"D{r[a]}" if a == "head_dim" else SHORT_DTYPES.get(r[a], f"{a}={r[a]}")
                 for a in doc["axes"]]
        return "\n".join(parts + ([r["impl"].removeprefix("fastattn/")] if len(impls) > 1
                                   else []))
    fig, axes = _figure(len(modes), 1, width=max(11.0, 0.7 * len(rows) / max(1, len(modes))))
    for (ax,), mode in zip(axes, modes):
        mine = [r for r in rows if r["mode"] == mode]
        pos = range(len(mine))
        for shift, base in ((-0.2, "naive"), (0.2, "torch")):
            ax.bar([p + shift for p in pos], [r.get(f"speedup_vs_{base}", 0) for r in mine],
                   0.4, label=f"speed vs {base}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(list(pos), [label(r) for r in mine], fontsize=8)
        ax.set(ylabel="× (higher is faster)", title=f"{doc['sweep_of']} {mode}")
        ax.legend()
    prov = doc["provenance"]
    _save(fig, f"{doc['sweep_of']} sweep on {prov['device']}, torch {prov['torch']}, "
               f"{prov['date'][:10]}", path)


def plot_gpt(doc: dict, path: Path) -> None:
    """The GPT benchmark: training tokens/s and extra memory against T, per variant."""
    fig, ((ax_t, ax_m),) = _figure(1, 2, height=4.0)
    rows = [r for r in doc["rows"] if r["status"] == "ok" and "tokens_per_s" in r]
    for variant in dict.fromkeys(r["variant"] for r in doc["rows"]):
        mine = [r for r in rows if r["variant"] == variant]
        _line(ax_t, [(r["T"], r["tokens_per_s"]) for r in mine], variant)
        _line(ax_m, [(r["T"], r["extra_mem_mib"]) for r in mine if "extra_mem_mib" in r],
              variant)
    sizes = sorted({r["T"] for r in doc["rows"]})
    for ax, what in ((ax_t, "training tokens/s"), (ax_m, "extra peak memory (MiB)")):
        _size_axis(ax, sizes, "sequence length T", what, what, log_y=False)
    prov = doc["provenance"]
    _save(fig, f"GPT naive vs fast on {prov['device']}, torch {prov['torch']}, "
               f"{prov['date'][:10]}", path)


def plot(doc: dict, path: Path) -> None:
    """The plot of any results document ``report`` knows; ValueError for another."""
    plots = {"op": plot_run, "sweep": plot_sweep, "gpt": plot_gpt}
    what = kind(doc)
    if what not in plots:
        raise ValueError(f"no plot for a results document of op {doc.get('op')!r}")
    plots[what](doc, path)
