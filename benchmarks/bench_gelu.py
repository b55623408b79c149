"""pytest-benchmark cases for bias-GELU, ``gelu(x + b)`` over (M, N) rows: the erf
formula vs ``F.gelu(x + b)`` vs every fastattn backend, fwd and fwd+bwd, grouped per
mode and size (``bias_gelu fwd N=256 M=64``).

Cases, correctness check and timing come from ``_cases``, sizes and implementations from
``fastattn.benchmark``. The C++ extension is built (or its cached build loaded) first, so
that the ext backend is measured; if it cannot be built, its cases are skipped with the
reason. Tiny sizes by default (widths 256 and 1024, 64 rows); ``--bench-full`` or
``FASTATTN_BENCH_FULL=1`` selects the full ones. ``extra_info`` holds the bytes moved
per call and GB/s.
"""
import _cases


@_cases.parametrize("bias_gelu", keys=("N", "M"), tiny={"sizes": [256, 1024], "batch": 64},
                    load_ext=True)
def test_bias_gelu(benchmark, case):
    _cases.measure(benchmark, case)
