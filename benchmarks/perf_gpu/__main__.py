"""``python -m benchmarks.perf_gpu``: see :mod:`benchmarks.perf_gpu.run`."""

from .run import main

raise SystemExit(main())
