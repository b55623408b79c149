"""The benchmark harness behind ``fastattn bench``: every registered op
(``fastattn.ops.registry``) against its textbook baseline and torch's built-in, in one run.

For every op, size and mode (``fwd``, or ``fwd+bwd``: the forward with autograd and the
gradients of all inputs) it measures, on one device:

* **correctness first**: each implementation's output (and gradients) is compared with
  the naive baseline run in float32 on the same inputs; a wrong result gets no number.
* **time**: on CUDA ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls)
  20/50/80 % quantiles; on CPU ``time.perf_counter`` after a warm-up call, median of at
  least ``MIN_REPEATS`` calls within a time budget. Calls rotate between two sets of
  fresh random inputs.
* **work rate**: TFLOP/s or GB/s from the entry's work model and its fraction of the
  device's peak, measured in the same run (a large matmul or copy in the benchmark
  dtype, its 20 % quantile time).
* **extra peak memory**: on CUDA ``torch.cuda.max_memory_allocated`` minus what was
  allocated before the call. On CPU each (implementation, size, mode) runs once in a
  fresh process forked from a server that has imported torch and run nothing
  (``memory_server``).

On CPU the timing runs in a child process that keeps freed memory in glibc's heap
(``allocator``), and ``run`` starts it and the memory server at once, so that their
imports overlap; the memory jobs run after the timing, so no measurement shares the
cores with another.

Modules, each one job, lower ones first: ``ops`` (a registry entry as the harness sees
it), ``config`` (one run's settings), ``timing``, ``check`` (correctness), ``memory``
(peak-memory readings), ``allocator``, ``provenance``, ``measure`` (the check-then-time
loop), ``memory_server``, ``run`` (the processes and the results document), ``sweep``;
``report`` (tables and captions of every results document), ``plots`` and ``results``
(saving). ``fastattn.tools.bench_gpt`` and ``fastattn.tools.gpu_check`` use the same
timing, provenance and report code.
"""
