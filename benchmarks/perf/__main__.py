"""``python -m benchmarks.perf``: see :mod:`benchmarks.perf.run`."""

from .run import main

raise SystemExit(main())
