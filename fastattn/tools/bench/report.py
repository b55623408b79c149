"""Tables, captions and headlines of every results document: an op run (``fastattn
bench``), a sweep (``fastattn bench --sweep``) and the GPT benchmark
(``fastattn.tools.bench_gpt``). ``fastattn bench``, the GPT benchmark, the GPU check and
``benchmarks/update_readme.py`` all print what this module renders."""
from __future__ import annotations

from fastattn.tools.common import render_table

LEGEND = ("speed vs X = X's time / this time (higher is faster); "
          "mem X/x = X's extra peak memory / this one's (higher uses less)")
FAULTS_NOTE = 2560              # page faults per timed call (10 MiB) worth a table note


def fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "ratio":
        return f"{value:.0f}×" if value >= 100 else f"{value:.1f}×"
    if kind == "pct":
        return f"{value:.1f}"
    return f"{value:.0f}" if value >= 1000 else f"{value:.3g}"


def commit_label(prov: dict) -> str:
    return (prov["commit"] or "no commit")[:10] + (" (dirty)" if prov["dirty"] else "")


# ------------------------------------------------------------------------ op runs


def table_rows(results: dict) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, cells and footnotes of an op run's table (shared by text and markdown)."""
    x, rows, rate_key = results["x"], results["rows"], results.get("rate_key", "tflops")
    show_batch = len({r["shape"].get("B") for r in rows}) > 1
    builtin = next((r["impl"] for r in rows if r["kind"] == "torch"), "torch")
    header = ["impl", *(["B"] if show_batch else []), x, "mode", "time ms",
              results["unit"], "% peak", "extra MiB", "speed vs naive", "mem naive/x",
              f"speed vs {builtin}", f"mem {builtin}/x"]
    cells, notes = [], []
    for r in rows:
        where = f"{r['impl']} {x}={r[x]} {r['mode']}"
        if r["status"] == "ok":
            time_cell = fmt(r["time_ms"]["p50"], "num")
        elif r["status"] == "wrong":
            time_cell = f"WRONG (err {r['max_rel_error']:.1e})"
        else:
            time_cell = "ERROR"
            notes.append(f"{where}: {r['error']}")
        if r.get("mem_error"):
            notes.append(f"{where} memory: {r['mem_error']}")
        faults = (r.get("time_ms") or {}).get("faults_per_call") or 0
        if faults > FAULTS_NOTE:
            notes.append(f"{where}: {faults:.0f} page faults per timed call (fresh memory "
                         "from the OS: its first-touch cost is in the time)")
        cells.append([r["impl"], *([str(r["shape"]["B"])] if show_batch else []), str(r[x]),
                      r["mode"], time_cell,
                      fmt(r.get(rate_key), "num"), fmt(r.get("pct_peak"), "pct"),
                      fmt(r.get("extra_mem_mib"), "num"),
                      *(fmt(r.get(f"{what}_vs_{base}"), "ratio") for base in ("naive", "torch")
                        for what in ("speedup", "mem_ratio"))])
    notes += [f"{name}: not run ({why})" for name, why in results.get("skipped", {}).items()]
    return header, cells, notes


def format_table(results: dict, markdown: bool = False) -> str:
    header, cells, notes = table_rows(results)
    return render_table(header, cells, markdown, [LEGEND, *notes],
                        left=(header.index("impl"), header.index("mode")), md_left=3)


def summary(results: dict) -> list[str]:
    """One line per fastattn implementation and mode at the largest size: how much
    faster than naive and with how much less extra memory."""
    x, rows = results["x"], results["rows"]
    largest = max((r[x] for r in rows), default=None)
    lines = []
    for r in rows:
        if r["kind"] == "fastattn" and r[x] == largest and r["status"] == "ok":
            ratios = [f"{r[k]:.1f}× {what}" for k, what in (
                ("speedup_vs_naive", "faster"), ("mem_ratio_vs_naive", "less extra memory"))
                if k in r]
            lines.append(f"{r['impl']} at {x}={largest} {r['mode']}: "
                         f"{', '.join(ratios) or 'no ratio'} than naive")
    return lines


def describe(results: dict) -> str:
    """One line: what was measured where, with what (the table's caption)."""
    cfg, prov, peak, x = results["config"], results["provenance"], results["peak"], results["x"]
    shapes = [r["shape"] for r in results["rows"]] or results.get("shapes", [])
    fixed = ", ".join(f"{k}={v}" for k, v in shapes[0].items()
                      if k != x and all(s[k] == v for s in shapes)) if shapes else ""
    return "; ".join([
        f"{results['op']} on {prov['device']}",
        f"{cfg['dtype']}, {'causal' if cfg['causal'] else 'not causal'}, {fixed}",
        f"peak {peak[results.get('rate_key', 'tflops')]:.3g} {results['unit']} "
        f"({peak['how']})",
        f"torch {prov['torch']}, triton {prov['triton']}, CUDA {prov['cuda']}, "
        f"{prov['threads']} threads",
        f"allocator: {prov['allocator']['timing']}",
        f"load average at start {prov.get('load_average_at_start')} on "
        f"{prov.get('cpu_cores')} cores",
        f"commit {commit_label(prov)}, {prov['date']}"])


# -------------------------------------------------------------------------- sweeps


def sweep_rows(doc: dict) -> list[dict]:
    """The fastattn rows of every run, each with its sweep point: what the sweep table
    and plot show (the naive and torch rows are in the ratios)."""
    return [{**run_doc["sweep_point"], **r} for run_doc in doc["runs"]
            for r in run_doc["rows"] if r["kind"] == "fastattn"]


def format_sweep_table(doc: dict, markdown: bool = False) -> str:
    """One line per sweep point, size, mode and fastattn backend."""
    axes, x, rate = list(doc["axes"]), doc["x"], doc.get("rate_key", "tflops")
    header = [*axes, x, "mode", "impl", "time ms", doc["unit"], "% peak", "speed vs naive",
              "speed vs torch", "mem naive/x"]
    cells = [[*(("yes" if r[a] else "no") if a == "causal" else str(r[a]) for a in axes),
              str(r[x]), r["mode"], r["impl"],
              fmt(r["time_ms"]["p50"], "num") if r["status"] == "ok" else r["status"].upper(),
              fmt(r.get(rate), "num"), fmt(r.get("pct_peak"), "pct"),
              fmt(r.get("speedup_vs_naive"), "ratio"), fmt(r.get("speedup_vs_torch"), "ratio"),
              fmt(r.get("mem_ratio_vs_naive"), "ratio")]
             for r in sweep_rows(doc)]
    return render_table(header, cells, markdown, [LEGEND])


def describe_sweep(doc: dict) -> str:
    """The sweep table's caption: what was crossed, at which size, where."""
    first, prov = doc["runs"][0], doc["provenance"]
    x = doc["x"]
    shape = first["rows"][0]["shape"] if first["rows"] else first["shapes"][0]
    swept = {{"head_dim": "D", "heads": "H", "batch": "B"}.get(a) for a in doc["axes"]}
    fixed = ", ".join(f"{k}={v}" for k, v in shape.items() if k != x and k not in swept)
    crossed = "; ".join(f"{a} ∈ {{{', '.join(map(str, v))}}}" for a, v in doc["axes"].items())
    return (f"{doc['sweep_of']} sweep on {prov['device']}: {crossed}; {x} = "
            f"{', '.join(str(s) for s in doc['config']['sizes'])}, {fixed}; every point is a "
            f"full `fastattn bench` run (naive, torch and fastattn, checked, then timed); "
            f"torch {prov['torch']}, {prov['threads']} threads; allocator: "
            f"{prov['allocator']['timing']}; commit {commit_label(prov)}, {prov['date']}")


def sweep_headline(doc: dict) -> list[str]:
    """The range of the fastattn speed-ups over the sweep's points."""
    rows = [r for r in sweep_rows(doc) if "speedup_vs_naive" in r]
    if not rows:
        return []
    speedups = [r["speedup_vs_naive"] for r in rows]
    return [f"{len(doc['runs'])} settings; speed vs naive {min(speedups):.1f}× (worst) to "
            f"{max(speedups):.1f}×"]


# ------------------------------------------------------------------ GPT benchmark


def format_gpt_table(rows: list[dict], markdown: bool = False) -> str:
    header = ["T", "variant", "tokens/s", "step ms", "CPU ms", "extra MiB", "MFU %",
              "speed vs naive", "CPU time naive/x", "mem naive/x", "status"]

    def ratio(r: dict, k: str) -> str:
        return f"{r[k]:.2f}×" if k in r else "-"
    cells = [[str(r["T"]), r["variant"], f"{r['tokens_per_s']:,.0f}", f"{r['step_ms']:.1f}",
              f"{r['cpu_ms']:.1f}" if "cpu_ms" in r else "-",
              f"{r['extra_mem_mib']:,.0f}" if "extra_mem_mib" in r else "-",
              f"{100 * r['mfu']:.1f}", ratio(r, "speedup_vs_naive"),
              ratio(r, "cpu_speedup_vs_naive"), ratio(r, "mem_ratio_vs_naive"), r["status"]]
             if "tokens_per_s" in r else
             [str(r["T"]), r["variant"], *["-"] * 8, f"{r['status']}: {r['error']}"]
             for r in rows]
    return render_table(header, cells, markdown)


def gpt_summary(rows: list[dict]) -> list[str]:
    """One line per length: the fast GPT's speed and memory against the naive one."""
    return [f"fast GPT at T={r['T']}: {r['speedup_vs_naive']:.2f}× the naive tokens/s"
            + (f", naive/fast extra memory {r['mem_ratio_vs_naive']:.2f}×"
               if "mem_ratio_vs_naive" in r else "")
            for r in rows if "speedup_vs_naive" in r]


def describe_gpt(doc: dict) -> str:
    r, prov = doc["rows"][0], doc["provenance"]
    return (f"GPT training on {prov['device']}: {r['n_layer']} layers, width {r['n_embd']}, "
            f"{r['n_head']} heads, batch {r['batch']}, vocab {r['vocab_size']}, {r['dtype']}, "
            f"AdamW; median of {r['steps']} steps; peak {doc['peak']['tflops']:.3g} TFLOP/s "
            f"({doc['peak']['how']}); torch {prov['torch']}, {prov['threads']} threads; "
            f"allocator: {prov['allocator']['timing']}; load average at start "
            f"{prov.get('load_average_at_start')}; commit {commit_label(prov)}, {prov['date']}")


# -------------------------------------------------------------- any results document


def kind(doc: dict) -> str | None:
    """"sweep", "op" (a ``fastattn bench`` run), "gpt", or None for another document."""
    if "runs" in doc:
        return "sweep"
    if doc.get("rows") and all("impl" in r and "kind" in r for r in doc["rows"]):
        return "op"
    return "gpt" if doc["op"] == "gpt" else None


def headline(doc: dict) -> list[str]:
    """The few lines that say how fastattn did, for any results document."""
    what = kind(doc)
    if what == "sweep":
        return sweep_headline(doc)
    if what == "op":
        return summary(doc)
    if what == "gpt":
        return gpt_summary(doc["rows"])
    return _other_headline(doc)


def _other_headline(doc: dict) -> list[str]:
    """Headlines of the documents of ``--op overhead`` / ``--op decode`` and of
    ``benchmarks/bench_lce_memory.py``."""
    if doc["op"] == "overhead":
        return [f"{r['call']} {r['mode']}: {r['ratio']:.2f}× torch's host time per call"
                for r in doc["rows"]]
    if doc["op"] == "decode":
        return [f"{r['preset']} {r['context']} context ({r['prompt_len']}-token prompt): "
                f"{r['variant']} {r['speedup_vs_naive']:.2f}× naive tokens/s"
                for r in doc["rows"] if r["variant"] != "naive"]
    if doc["op"] == "linear_cross_entropy_memory":
        return [f"{doc['what']}, vocab {doc['vocab']}: {doc['ratio']:.2f}× less extra peak "
                "memory fused than unfused"]
    return []


def readme_block(doc: dict) -> str | None:
    """Caption, headline lines and markdown table of a results document (None for a
    document this module does not know)."""
    what = kind(doc)
    if what == "sweep":
        caption, lines, table = describe_sweep(doc), [], format_sweep_table(doc, True)
    elif what == "op":
        caption, lines, table = describe(doc), summary(doc), format_table(doc, True)
    elif what == "gpt":
        caption, lines = describe_gpt(doc), gpt_summary(doc["rows"])
        table = format_gpt_table(doc["rows"], True)
    else:
        return None
    bullets = "".join(f"- {line}\n" for line in lines) + "\n" if lines else ""
    return f"{caption}\n\n{bullets}{table}"
