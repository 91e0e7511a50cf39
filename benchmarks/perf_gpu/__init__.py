"""GPU benchmark of LoRA transfer (issue 9): every GPU step in one command; run ``python -m benchmarks.perf_gpu``."""
