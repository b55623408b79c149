"""Tools that measure and check the library from outside: the benchmark harness
(``bench/``, behind ``fastattn bench``), the GPT benchmark (``bench_gpt``), the profiler
(``profile``, ``profile_report``), the GPU check (``gpu_check``) and ``fastattn
check-kernels`` (``check_kernels``). They take their ops from ``fastattn.ops.registry``.

The library never imports this package: it imports the library. The tools share only
``common`` (argument types, device and dtype names) and the harness's lower modules
(timing, memory, provenance, report, results), never each other's entry points.
"""
