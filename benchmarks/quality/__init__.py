"""Transfer-quality benchmark: a reproducible toy world that measures what LoRA-X's table measures.

Everything is generated and trained by this package on the CPU, seeded, with nothing
downloaded: procedural 16×16 shape images whose class label is the "prompt", a tiny
conditional diffusion UNet with Stable Diffusion's layer kinds and parameter names, four
base models (``source``, ``finetuned``, ``shallow``, ``unrelated``), style adapters trained
on ``source`` (LoRA rank 8/16 and LoRA-X), and the paper's protocol: sample on each target
with every transfer method and with an adapter retrained there, then score style, content
and distance to the retrained reference (LoRA-X, arXiv 2501.16559 §5; ProLoRA, arXiv
2506.04244).

Run ``python -m benchmarks.quality [--quick] [--out DIR]``.
"""
