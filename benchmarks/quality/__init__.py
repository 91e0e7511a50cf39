"""Transfer-quality benchmark: a reproducible toy world that measures what LoRA-X's table measures.

Everything is generated and trained by this package on the CPU, seeded, with nothing
downloaded: procedural 16×16 shape images whose class label is the "prompt", a tiny
conditional diffusion UNet with Stable Diffusion's layer kinds and parameter names, six
base models (``source``, ``finetuned``, ``heavy``, ``reparam``, ``shallow``, ``unrelated``),
style adapters trained on ``source`` (LoRA rank 8/16, LoRA-X, LoHa and LoKr), and the paper's protocol:
sample on each target with every transfer method, with the data-free refinement
(``distill.py`` → ``lorax_core.refine``) and with an adapter retrained there, then score
style, content, the target's own look and distance to the retrained reference (LoRA-X, arXiv
2501.16559 §5; ProLoRA, arXiv 2506.04244; Trans-LoRA, arXiv 2405.17258).

Run ``python -m benchmarks.quality [--quick] [--out DIR]``.
"""
