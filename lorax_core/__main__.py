"""``python -m lorax_core``: the command line (see :mod:`lorax_core.cli` and docs/CLI.md)."""

import sys

from .cli import main

sys.exit(main())
