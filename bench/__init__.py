"""Benchmarks of the pipeline: training speed, bookkeeping costs and orchestration at study scale.

`python -m pipeline bench` runs them all and writes BENCHMARKS.md. The modules
split the work by role:

- `bench.machine`: the machine description, timers and the measured matmul peak
- `bench.training`: tokens/s and MFU, QAT overhead, bookkeeping overhead
- `bench.orchestration`: manifest, submit, status and collect at 1,345 cells
- `bench.page`: the Markdown page
- `bench.suite`: runs the sections in order and writes the page
- `bench/collect.py`: the collect benchmark, also runnable on its own
"""
