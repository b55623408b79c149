"""GPT training throughput, naive vs fast: the script and its pytest-benchmark cases.

    python benchmarks/bench_gpt.py                       # CPU: T = 256, 512, 1024
    python benchmarks/bench_gpt.py --seq 1024 --steps 8 --save
    python benchmarks/bench_gpt.py --device cuda --save  # GPT-2 small, bf16
    pytest benchmarks/bench_gpt.py --benchmark-only      # one step of a tiny model

The measurement lives in ``fastattn.tools.bench_gpt`` (so that ``fastattn bench --op
gpt`` works from an installed package); its docstring says what is measured and how.
"""
import sys

import pytest
import torch

from fastattn.models import GPT, GPTConfig
from fastattn.models.optim import configure_optimizer
from fastattn.tools.bench_gpt import VARIANTS, main


@pytest.mark.parametrize("variant", VARIANTS)
def test_gpt_train_step(benchmark, variant):
    """One AdamW training step of a tiny GPT at T=128; both variants start from the same
    weights and must give the same loss before they are timed."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=128, n_layer=2, n_head=4, n_embd=128,
                          attention=variant)).to(device)
    opt = configure_optimizer(model, 1e-4, 0.1, (0.9, 0.95), fused=device == "cuda")
    torch.manual_seed(1)
    x = torch.randint(0, 256, (4, 128), device=device)
    with torch.no_grad():
        loss = model(x, x)[1]
    other = GPT(GPTConfig(vocab_size=256, block_size=128, n_layer=2, n_head=4, n_embd=128,
                          attention="naive" if variant == "fast" else "fast")).to(device)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(x, x)[1], loss, rtol=1e-4, atol=1e-5)

    def step():
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.group = "gpt train step T=128 B=4"
    benchmark.extra_info.update(variant=variant, tokens=4 * 128, first_loss=float(loss))
    benchmark(step)
    if benchmark.stats is not None:   # None under --benchmark-disable
        benchmark.extra_info["tokens_per_s"] = 4 * 128 / benchmark.stats.stats.median


if __name__ == "__main__":
    sys.exit(main())
