"""Saving a results document: ``<op>.json`` and its plot ``<op>.png``, by default into
``benchmarks/results/<device>/`` of the checkout (the files the README quotes)."""
from __future__ import annotations

import json
from pathlib import Path

from fastattn.tools.bench.plots import plot
from fastattn.tools.bench.provenance import REPO_ROOT


def default_results_dir(device_slug: str) -> Path:
    """``benchmarks/results/<device slug>/`` of the checkout (or of the working dir)."""
    root = REPO_ROOT if (REPO_ROOT / "benchmarks").is_dir() else Path.cwd()
    return root / "benchmarks" / "results" / device_slug


def save(doc: dict, directory: Path | str | None = None) -> tuple[Path, Path | None, str]:
    """Write ``<op>.json`` and ``<op>.png`` (a sweep: ``<op>_sweep.*``) into
    ``directory`` (default: ``default_results_dir`` of the document's device). Returns
    the paths and a note (why there is no plot, or "")."""
    directory = Path(directory or default_results_dir(doc["provenance"]["device_slug"]))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{doc['op']}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    png = directory / f"{doc['op']}.png"
    try:
        plot(doc, png)
    except ImportError:
        return path, None, "no plot: matplotlib is not installed (pip install matplotlib)"
    except ValueError as e:              # a document without a plot (overhead, decode)
        return path, None, str(e)
    return path, png, ""
