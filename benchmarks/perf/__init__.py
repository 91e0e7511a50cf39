"""Speed and memory benchmark of LoRA transfer (issue 5); run ``python -m benchmarks.perf``."""
