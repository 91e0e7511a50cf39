"""The pack's own socket types (ids are permanent: saved workflows store them)."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

# A lazy handle on the source model file (nodes._host.SourceModel).
LoraxSource = io.Custom("LORAX_SOURCE")
# A lorax_core.similarity.SimilarityTable, reused by Transfer LoRA.
LoraxSimilarity = io.Custom("LORAX_SIMILARITY")
