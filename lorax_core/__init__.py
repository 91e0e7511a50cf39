"""lorax_core: host-free, training-free LoRA transfer between base models (LoRA-X, ProLoRA).

Importing this package loads torch and the core's own modules only (no ComfyUI, no scipy
until layer matching needs it, no file formats). See ``docs/CORE.md`` for a tour.
"""

from .errors import (
    CacheError,
    FormatError,
    IncompatibleBaseError,
    LayerSkippedError,
    LoraxError,
    NonFiniteError,
    NothingTransferableError,
    OptionError,
    OutputError,
    OutputExistsError,
    RankError,
    ShapeMismatchError,
    UnsafeFileError,
    with_context,
)
from .linalg import Subspace, factored_norm, flatten_weight, recompress, top_subspace
from .lorax_module import LoraXConv2d, LoraXLinear, add_lorax, collect_lorax
from .matching import LayerMatch, layer_kind, match_layers
from .similarity import (
    LayerSimilarity,
    SimilarityTable,
    chance_level,
    compute_similarity,
    layer_similarity,
    phi,
    similarity_rank,
    threshold_for,
)
from .subspaces import SubspaceProvider
from .transfer import choose_method, lorax_to_lora, transfer_adapter, transfer_lora_layer, transfer_lorax_layer
from .types import (
    METHODS,
    AdapterLayer,
    DictWeights,
    LayerReport,
    LoraFactors,
    LoraXFactors,
    TransferOptions,
    TransferReport,
    TransferResult,
    WeightSource,
)

__all__ = [
    "METHODS",
    "AdapterLayer",
    "CacheError",
    "DictWeights",
    "FormatError",
    "IncompatibleBaseError",
    "LayerMatch",
    "LayerReport",
    "LayerSimilarity",
    "LayerSkippedError",
    "LoraFactors",
    "LoraXConv2d",
    "LoraXFactors",
    "LoraXLinear",
    "LoraxError",
    "NonFiniteError",
    "NothingTransferableError",
    "OptionError",
    "OutputError",
    "OutputExistsError",
    "RankError",
    "ShapeMismatchError",
    "SimilarityTable",
    "Subspace",
    "SubspaceProvider",
    "TransferOptions",
    "TransferReport",
    "TransferResult",
    "UnsafeFileError",
    "WeightSource",
    "add_lorax",
    "chance_level",
    "choose_method",
    "collect_lorax",
    "compute_similarity",
    "factored_norm",
    "flatten_weight",
    "layer_kind",
    "layer_similarity",
    "lorax_to_lora",
    "match_layers",
    "phi",
    "recompress",
    "similarity_rank",
    "threshold_for",
    "top_subspace",
    "transfer_adapter",
    "transfer_lora_layer",
    "transfer_lorax_layer",
    "with_context",
]
