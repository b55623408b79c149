"""Decoding speed: ``GPT.generate`` tokens/s with the fast GPT against the naive one,
same weights, same tokens, per preset and context length, with and without the
compiled decoding step.

    fastattn bench --op decode [--quick] [--save [DIR]] [--device cpu|cuda]

For each preset (CPU: ``small``; CUDA: ``small`` and ``gpt2``) and context (``short``: a
32-token prompt; ``long``: a prompt of ``block_size - new_tokens``, so the last step
sees a full window) it builds the naive and the fast model (seed 0: the same weights),
decodes ``new_tokens`` tokens greedily from one random prompt (batch 1) with each
variant — naive, fast, and fast with ``compile=True`` — checks that all give the same
tokens, then times whole ``generate`` calls (prefill included), the variants
interleaved round by round; a variant's time is its fastest round. tokens/s =
new_tokens / time. On CPU torch runs one thread (the steadier number on a shared
machine; recorded). The compiled variant is compiled and warmed up before timing.
Saved as ``benchmarks/results/<device>/decode.json``.
"""
from __future__ import annotations

import time

import torch

from fastattn.models import GPT, GPTConfig
from fastattn.tools.bench.provenance import load_average, provenance
from fastattn.tools.bench.results import save

VARIANTS = ("naive", "fast", "fast+compile")
NEW_TOKENS = 32
PRESETS = {"cpu": ["small"], "cuda": ["small", "gpt2"]}
SHORT_PROMPT = 32


def _model(preset: str, attention: str, device: torch.device) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig.from_preset(preset, attention=attention, dropout=0.0)
    return GPT(config).to(device).eval()


def measure_case(preset: str, context: str, device: torch.device, new_tokens: int,
                 rounds: int, compile: bool) -> list[dict]:
    """The rows of one (preset, context): one per variant, with tokens/s and the
    speedup against naive; ``same_tokens`` False marks a disagreement."""
    models = {"naive": _model(preset, "naive", device)}
    models["fast"] = _model(preset, "fast", device)
    bs = models["fast"].config.block_size
    prompt_len = SHORT_PROMPT if context == "short" else bs - new_tokens
    g = torch.Generator().manual_seed(1)
    vocab = models["fast"].config.vocab_size
    idx = torch.randint(0, vocab, (1, prompt_len), generator=g).to(device)
    runs = {"naive": lambda: models["naive"].generate(idx, new_tokens, temperature=0),
            "fast": lambda: models["fast"].generate(idx, new_tokens, temperature=0)}
    if compile:
        runs["fast+compile"] = lambda: models["fast"].generate(idx, new_tokens, temperature=0,
                                                               compile=True)
    outputs = {name: run() for name, run in runs.items()}          # warm-up (compiles)
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - t0)
    rows = []
    for name in runs:
        rows.append({"preset": preset, "context": context, "prompt_len": prompt_len,
                     "new_tokens": new_tokens, "variant": name,
                     "tokens_per_s": new_tokens / best[name], "seconds": best[name],
                     "speedup_vs_naive": best["naive"] / best[name],
                     "same_tokens": torch.equal(outputs[name], outputs["naive"])})
    return rows


def run_decode(device: str = "cpu", quick: bool = False, compile: bool = True,
               threads: int | None = 1) -> dict:
    """Every preset × context; the results document."""
    load = load_average()
    if threads and device == "cpu":
        torch.set_num_threads(threads)
    presets = ["tiny"] if quick else PRESETS[device]
    new_tokens, rounds = (8, 2) if quick else (NEW_TOKENS, 10)
    rows = [row for preset in presets for context in ("short", "long")
            for row in measure_case(preset, context, torch.device(device), new_tokens,
                                    rounds, compile)]
    prov = provenance(device, "float32", torch.get_num_threads(), load)
    return {"schema": 1, "op": "decode", "unit": "tokens/s",
            "config": {"rounds": rounds, "new_tokens": new_tokens, "batch": 1,
                       "quick": quick, "compile": compile},
            "provenance": prov, "rows": rows}


def format_table(doc: dict) -> str:
    lines = ["| preset | context | prompt | variant | tokens/s | vs naive | same tokens |",
             "|---|---|---:|---|---:|---:|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['preset']} | {r['context']} | {r['prompt_len']} | {r['variant']} | "
                     f"{r['tokens_per_s']:,.1f} | {r['speedup_vs_naive']:.2f}× | "
                     f"{'yes' if r['same_tokens'] else 'NO'} |")
    return "\n".join(lines)


def readme_block(doc: dict) -> str:
    prov, cfg = doc["provenance"], doc["config"]
    caption = (f"Greedy `GPT.generate`, batch 1, {cfg['new_tokens']} new tokens (prefill "
               f"included), fastest of {cfg['rounds']} interleaved rounds; "
               f"{prov['threads']} thread(s), {prov['dtype']}, torch {prov['torch']}, "
               f"{prov['date'][:10]}.")
    return f"{caption}\n\n{format_table(doc)}"


def bench_and_report(command: str, device: str | None, quick: bool, save_dir: str | None
                     ) -> int:
    """What ``fastattn bench --op decode`` runs. Exit status 1 if a variant's tokens
    differ from the naive model's."""
    start = time.perf_counter()
    doc = run_decode(device or "cpu", quick)
    doc["provenance"]["command"] = command
    print(readme_block(doc))
    if save_dir is not None:
        print(f"\nsaved {save(doc, save_dir or None)[0]}")
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    return 0 if all(r["same_tokens"] for r in doc["rows"]) else 1
