"""Sample from a trained GPT checkpoint.

    python -m fastattn.sample --checkpoint runs/tiny --prompt "def " --max-new-tokens 200
    fastattn sample --checkpoint runs/tiny/ckpt.pt --top-k 50 --top-p 0.95 --seed 0

Loads the model and tokenizer the checkpoint holds, encodes the prompt and decodes
``GPT.generate``'s continuation (KV-cache decoding, autocast as in training).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from fastattn.models.checkpoint import CheckpointError, load_model
from fastattn.models.gpt import ATTENTION
from fastattn.models.optim import choose_precision


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
    """``python -m fastattn.sample``: parse ``argv``, print the samples."""
    parser = argparse.ArgumentParser(prog="python -m fastattn.sample",
                                     description="Generate text from a fastattn GPT checkpoint.")
    add_sample_arguments(parser)
    return sample_main(parser.parse_args(argv))


__all__ = ["add_sample_arguments", "main", "sample", "sample_main"]

if __name__ == "__main__":
    sys.exit(main())
