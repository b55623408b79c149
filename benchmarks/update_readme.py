"""Regenerate the README's results tables from the committed results files.

    python benchmarks/update_readme.py [--readme README.md] [--results benchmarks/results]
                                       [--check]

For every op with results (``<results>/<device>/<op>.json``, written by
``fastattn bench --save``), the text between the lines ``<!-- results:<op>:begin -->``
and ``<!-- results:<op>:end -->`` of the README is replaced by one table per device,
each naming its device, settings and source file. Nothing outside the markers changes.
An op whose markers are missing is reported and left out. ``--check`` writes nothing
and exits 1 if the README is out of date.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from fastattn.tools.bench import decode, overhead
from fastattn.tools.bench.report import readme_block

ROOT = Path(__file__).resolve().parents[1]


def load_results(results_dir: Path) -> dict[str, list[tuple[Path, dict]]]:
    """{op: [(path, results), ...]}, GPUs first, then by device folder."""
    by_op: dict[str, list[tuple[Path, dict]]] = {}
    for path in sorted(results_dir.glob("*/*.json"),
                       key=lambda p: (p.parent.name.startswith("cpu-"), p.parent.name)):
        results = json.loads(path.read_text())
        by_op.setdefault(results["op"], []).append((path, results))
    return by_op


def block(entries: list[tuple[Path, dict]], readme_dir: Path) -> str:
    """The markdown that goes between one op's markers."""
    parts = []
    for path, results in entries:
        source = Path(os.path.relpath(path, readme_dir)).as_posix()
        png = path.with_suffix(".png")
        plot = (f", plot [`{png.name}`]({Path(os.path.relpath(png, readme_dir)).as_posix()})"
                if png.exists() else "")
        prov = results["provenance"]
        parts.append(f"**{prov['device']}** — from [`{source}`]({source}){plot}, made by "
                     f"`{prov.get('command', 'fastattn bench --save')}`.\n\n"
                     + render(results))
    return "\n\n".join(parts)


# Documents with their own table: host overhead per call, decoding tokens/s.
OWN_TABLES = {"overhead": overhead.readme_block, "decode": decode.readme_block}


def render(results: dict) -> str:
    """Caption and table of one results file: the harness's report
    (``fastattn.tools.bench.report``) for its own documents — op runs, sweeps, the GPT
    benchmark —, ``OWN_TABLES`` for overhead and decode, else a generic table of the
    rows' scalar fields."""
    if results["op"] in OWN_TABLES:
        return OWN_TABLES[results["op"]](results)
    return readme_block(results) or generic_table(results["rows"])


def generic_table(rows: list[dict]) -> str:
    scalar = (str, int, float, bool, type(None))
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, scalar)))

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
        return "-" if v is None else str(v)
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                      *("| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows)])


def update(text: str, by_op: dict[str, list[tuple[Path, dict]]], readme_dir: Path
           ) -> tuple[str, list[str]]:
    """The README text with every op's block replaced, and the ops that have no markers."""
    missing = []
    for op, entries in by_op.items():
        pattern = re.compile(rf"(^<!-- results:{re.escape(op)}:begin -->[ \t]*\n)(.*?)"
                             rf"(^<!-- results:{re.escape(op)}:end -->)", re.S | re.M)
        if not pattern.search(text):
            missing.append(op)
            continue
        body = block(entries, readme_dir) + "\n"
        text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(3), text, count=1)
    return text, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the README is out of date")
    args = parser.parse_args(argv)
    by_op = load_results(args.results)
    if not by_op:
        print(f"no results under {args.results}", file=sys.stderr)
        return 1
    old = args.readme.read_text()
    new, missing = update(old, by_op, args.readme.resolve().parent)
    for op in missing:
        print(f"{args.readme}: no '<!-- results:{op}:begin/end -->' markers; "
              f"{op} left out", file=sys.stderr)
    if args.check:
        print(f"{args.readme} is {'up to date' if new == old else 'out of date'}")
        return 0 if new == old else 1
    if new != old:
        args.readme.write_text(new)
    print(f"{args.readme}: {', '.join(op for op in by_op if op not in missing) or 'nothing'}"
          f" {'updated' if new != old else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
