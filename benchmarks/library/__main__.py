"""``python -m benchmarks.library``: see :mod:`benchmarks.library.run`."""

from .run import main

raise SystemExit(main())
