"""pytest-benchmark cases for attention: naive T×T vs torch SDPA vs fastattn, fwd and
fwd+bwd, grouped per mode and size (``attention fwd T=128 B=1``).

Cases, correctness check and timing come from ``_cases`` (shared by every bench module),
sizes and implementations from ``fastattn.benchmark``. Tiny sizes by default (T = 128,
256, 4 heads); ``--bench-full`` or ``FASTATTN_BENCH_FULL=1`` selects the full ones.
``extra_info`` holds FLOPs and TFLOP/s (``attention_flops``).
"""
import _cases


@_cases.parametrize("attention", keys=("T", "B"), tiny={"sizes": [128, 256], "heads": 4})
def test_attention(benchmark, case):
    _cases.measure(benchmark, case, causal=case.cfg.causal)
