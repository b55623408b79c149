"""pytest-benchmark cases of every registered op (``fastattn.ops.registry``): its naive
baseline vs torch's built-in vs every fastattn backend, fwd and fwd+bwd, grouped per op,
mode and shape (``layer_norm fwd M=64 N=96``).

Cases, correctness check and timing come from ``_cases`` (the harness behind
``fastattn bench``), so a newly registered op is benchmarked here without editing this
file. Tiny sizes by default; ``--bench-full`` or ``FASTATTN_BENCH_FULL=1`` selects the
full ones. ``extra_info`` holds the work per call (FLOPs or bytes) and its rate
(TFLOP/s or GB/s).
"""
import _cases


@_cases.parametrize()
def test_op(benchmark, case):
    _cases.measure(benchmark, case)
