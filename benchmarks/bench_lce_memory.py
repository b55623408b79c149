"""Peak memory of a GPT training step (CPU): the LM head and loss fused
(``fastattn.linear_cross_entropy``) against ``lm_head`` + ``F.cross_entropy``, one run.

    python benchmarks/bench_lce_memory.py --save     # GPT step, vocab 50,257 -> results
    python benchmarks/bench_lce_memory.py --loss-only

Each variant runs in a fresh subprocess (one cannot reuse the other's freed pages) with
MALLOC_MMAP_THRESHOLD_=65536 for both, so large blocks are mmapped and go back to the OS
when freed and the resident set follows the live tensors. "extra" is the peak RSS of
forward + backward minus the RSS just before (``fastattn.tools.bench.memory``): the
weights are not counted, their gradients are. Both variants use the same weights and
tokens; the parent checks that they give the same loss and gradients. Writes
``linear_cross_entropy_memory.json`` into ``benchmarks/results/<device>/`` with --save.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch


def child(args) -> None:
    import torch.nn.functional as F

    from fastattn.models.gpt import GPT, GPTConfig
    from fastattn.ops.linear_cross_entropy import linear_cross_entropy
    from fastattn.tools.bench.memory import extra_memory_mib, memory_before

    torch.manual_seed(0)
    b, t, c, v = args.batch, args.seq, args.embd, args.vocab
    targets = torch.randint(0, v, (b, t))
    targets[:, -3:] = -1                                     # some ignored positions
    fused = args.variant == "fused"
    if args.loss_only:
        h = torch.randn(b, t, c).requires_grad_()
        w = (torch.randn(v, c) * 0.02).requires_grad_()
        leaves = [h, w]

        def step():
            if fused:
                return linear_cross_entropy(h, w, targets, ignore_index=-1)
            return F.cross_entropy(F.linear(h, w).float().flatten(0, 1), targets.flatten(),
                                   ignore_index=-1)
    else:
        model = GPT(GPTConfig(vocab_size=v, block_size=t, n_layer=args.layers,
                              n_head=max(1, c // 64), n_embd=c, fused_loss=fused))
        idx = torch.randint(0, v, (b, t))
        leaves = [model.wte.weight, model.blocks[0].attn.qkv_proj.weight]

        def step():
            return model(idx, targets)[1]

    before = memory_before(torch.device("cpu"))
    loss = step()
    loss.backward()
    extra = extra_memory_mib(torch.device("cpu"), before)
    torch.save({"loss": loss.detach(), "grads": [p.grad for p in leaves]}, args.out)
    print(json.dumps({"variant": args.variant, "extra_mib": extra, "loss": loss.item()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--embd", type=int, default=256)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--loss-only", action="store_true", help="just the loss: h (B, T, C), W")
    p.add_argument("--save", nargs="?", const="", default=None, metavar="DIR",
                   help="write linear_cross_entropy_memory.json (default results folder)")
    p.add_argument("--variant", choices=["fused", "unfused"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return child(args)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    argv = [a for a in sys.argv[1:] if a != "--save" and not a.startswith("--save=")]
    if args.save:
        argv = [a for a in argv if a != args.save]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("unfused", "fused"):
            out = os.path.join(tmp, f"{variant}.pt")
            run = subprocess.run([sys.executable, __file__, *argv, "--variant", variant,
                                  "--out", out], env=env, check=True, capture_output=True,
                                 text=True)
            results[variant] = (json.loads(run.stdout.strip().splitlines()[-1]),
                                torch.load(out))
    (u, ut), (f, ft) = results["unfused"], results["fused"]
    loss_err = (ut["loss"] - ft["loss"]).abs().item()
    grad_err = max(((a - b).abs().max() / a.abs().max()).item()
                   for a, b in zip(ut["grads"], ft["grads"]))
    what = "loss part" if args.loss_only else f"GPT training step, {args.layers} layers"
    print(f"{what}: B={args.batch} T={args.seq} C={args.embd} V={args.vocab}, fp32, CPU")
    print(f"  unfused extra peak {u['extra_mib']:8.1f} MiB   loss {u['loss']:.6f}")
    print(f"  fused   extra peak {f['extra_mib']:8.1f} MiB   loss {f['loss']:.6f}")
    ratio = u["extra_mib"] / f["extra_mib"]
    print(f"  ratio {ratio:.2f}x; |loss diff| {loss_err:.2e}; max rel grad diff {grad_err:.2e}")
    if loss_err > 1e-4 or grad_err > 1e-4:
        sys.exit("the fused and unfused losses or gradients differ")
    if args.save is not None:
        from fastattn.tools.bench.provenance import load_average, provenance
        from fastattn.tools.bench.results import default_results_dir
        prov = provenance("cpu", "float32", torch.get_num_threads(), load_average())
        prov["command"] = "python benchmarks/bench_lce_memory.py " + " ".join(sys.argv[1:])
        doc = {"op": "linear_cross_entropy_memory", "what": what, "batch": args.batch,
               "seq": args.seq, "embd": args.embd, "vocab": args.vocab,
               "layers": None if args.loss_only else args.layers,
               "unfused_extra_mib": u["extra_mib"], "fused_extra_mib": f["extra_mib"],
               "ratio": ratio, "loss_diff": loss_err, "max_rel_grad_diff": grad_err,
               "provenance": prov}
        directory = args.save or default_results_dir(prov["device_slug"])
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "linear_cross_entropy_memory.json")
        with open(path, "w") as fh:
            fh.write(json.dumps(doc, indent=1) + "\n")
        print(f"saved {path}")


if __name__ == "__main__":
    main()
