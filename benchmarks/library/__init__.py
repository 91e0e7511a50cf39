"""Folder migration benchmark (issue 20); see :mod:`benchmarks.library.run`."""
