"""pytest-benchmark cases for LayerNorm over (M, N) rows, plain and with a residual
(``LayerNorm(x + residual)``, returning the sum too): the textbook formula vs torch
(``F.layer_norm``, add + ``F.layer_norm``) vs every fastattn backend, fwd and fwd+bwd,
grouped per op, mode and size (``layer_norm fwd N=256 M=64``).

Cases, correctness check and timing come from ``_cases``, sizes and implementations from
``fastattn.benchmark``. The C++ extension is built (or its cached build loaded) first, so
that the ext backend is measured; if it cannot be built, its cases are skipped with the
reason. Tiny sizes by default (widths 256 and 1024, 64 rows); ``--bench-full`` or
``FASTATTN_BENCH_FULL=1`` selects the full ones. ``extra_info`` holds the bytes moved
per call and GB/s.
"""
import _cases

TINY = {"sizes": [256, 1024], "batch": 64}     # batch: the number of rows M


@_cases.parametrize("layer_norm", keys=("N", "M"), tiny=TINY, load_ext=True)
def test_layer_norm(benchmark, case):
    _cases.measure(benchmark, case)


@_cases.parametrize("residual_layer_norm", keys=("N", "M"), tiny=TINY, load_ext=True)
def test_residual_layer_norm(benchmark, case):
    _cases.measure(benchmark, case)
