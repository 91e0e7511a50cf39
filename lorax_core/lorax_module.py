"""Trainable LoRA-X wrappers for ``nn.Linear`` and ``nn.Conv2d`` (LoRA-X, arXiv 2501.16559, §4.1).

A wrapped layer computes ``base(x) + x·ΔWᵀ`` with ``ΔW = U_R · core · V_Rᵀ``: the base layer
and the top-R singular bases ``U_R``/``V_R`` of its weight are frozen, and only the core is
trained — a diagonal ΔΣ of R values (the paper's choice) or, optionally, a full R×R matrix.
The core starts at zero, so a freshly wrapped model computes exactly what the base computes.
The update is applied in factored form (two thin products, or a conv with the ``V_R`` filters
followed by 1×1 mixes), never by forming ΔW.

The bases come from :func:`lorax_core.linalg.top_subspace` (float32, sign-fixed), the same
function the transfer uses to recompute them from the source weight, so a trained core stays
valid when saved without its bases. Train with any loop; then call :func:`collect_lorax` to
get ``{model key: LoraXFactors}`` for ``transfer_adapter`` or a LoRA-X file writer.

:class:`LoraXDelta` is the same adapter in weight space (``W ↦ W + ΔW``), the form a host's
weight wrappers take (ComfyUI's training adapters patch the weight, not the layer); it is built
from a :class:`~lorax_core.linalg.Subspace` so that its bases can come from the transfer's cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import OptionError, ShapeMismatchError
from .linalg import Subspace, top_subspace
from .types import LoraXFactors, flat_shape

__all__ = ["LoraXConv2d", "LoraXDelta", "LoraXLinear", "add_lorax", "collect_lorax"]


class _LoraXBase(nn.Module):
    """Shared state: the frozen base layer, frozen U_R/V_R buffers and the trainable core."""

    U: torch.Tensor
    V: torch.Tensor

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, full_core: bool) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        sub = top_subspace(base.weight.detach(), rank)
        device = base.weight.device
        self.register_buffer("U", sub.U.to(device))  # (out, R), frozen
        self.register_buffer("V", sub.V.to(device))  # (in·kh·kw, R), frozen
        R = sub.rank
        shape = (R, R) if full_core else (R,)
        # Zero init: the wrapped layer starts out identical to the base layer (LoRA-X, arXiv 2501.16559, §4.1: ΔΣ starts at 0).
        self.core = nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=device))

    @property
    def rank(self) -> int:
        return int(self.core.shape[0])

    def factors(self) -> LoraXFactors:
        """The trained adapter of this layer (a detached CPU copy of the core)."""
        return LoraXFactors(core=self.core.detach().to("cpu").clone(), shape=tuple(self.base.weight.shape))

    def _mix(self, h: torch.Tensor, dim: int) -> torch.Tensor:
        # h holds the R coordinates along ``dim``; apply the core (diag: scale, full: matrix).
        core = self.core.to(h.dtype)
        if core.ndim == 1:
            shape = [1] * h.ndim
            shape[dim] = -1
            return h * core.reshape(shape)
        return torch.movedim(torch.movedim(h, dim, -1) @ core.T, -1, dim)


class LoraXLinear(_LoraXBase):
    """``y = base(x) + ((x V_R) · core) U_Rᵀ`` for a wrapped ``nn.Linear``.

    Args:
        base: the layer to adapt; its parameters are frozen (not copied).
        rank: R (paper: 320), clipped to ``min(out, in)``.
        full_core: train a full R×R core instead of the diagonal ΔΣ.

    Input ``(..., in)`` of any float dtype; the update is computed in the input's dtype.
    """

    def __init__(self, base: nn.Linear, rank: int = 320, *, full_core: bool = False) -> None:
        if not isinstance(base, nn.Linear):
            raise OptionError(f"LoraXLinear wraps nn.Linear; got {type(base).__name__}. Use LoraXConv2d for convs.")
        super().__init__(base, rank, full_core)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.V.to(x.dtype)  # (..., R)
        return self.base(x) + self._mix(h, -1) @ self.U.to(x.dtype).T


class LoraXConv2d(_LoraXBase):
    """A wrapped ``nn.Conv2d``: the update is a conv with the ``V_R`` filters, then 1×1 mixes.

    ``ΔW`` (out, in, kh, kw) = ``U_R core V_Rᵀ`` reshaped; applying it as conv(x, V_Rᵀ as R
    filters) → core → U_R keeps the cost at O(R·(in·kh·kw + out)) per pixel. The base conv's
    stride, padding and dilation are reused; grouped convs and non-zero padding modes are refused.

    Args:
        base: the ``nn.Conv2d`` to adapt (frozen, not copied); rank: R; full_core: see LoraXLinear.
    """

    def __init__(self, base: nn.Conv2d, rank: int = 320, *, full_core: bool = False) -> None:
        if not isinstance(base, nn.Conv2d):
            raise OptionError(f"LoraXConv2d wraps nn.Conv2d; got {type(base).__name__}. Use LoraXLinear for linears.")
        if base.groups != 1 or base.padding_mode != "zeros":
            raise OptionError(
                f"LoraXConv2d supports groups=1 and padding_mode='zeros'; got groups={base.groups}, "
                f"padding_mode={base.padding_mode!r}. Leave this layer unadapted."
            )
        super().__init__(base, rank, full_core)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        filters = self.V.T.reshape(self.rank, *base.weight.shape[1:]).to(x.dtype)  # (R, in, kh, kw)
        h = F.conv2d(x, filters, None, base.stride, base.padding, base.dilation)  # (B, R, H', W')
        h = self._mix(h, 1)
        update = torch.einsum("brhw,or->bohw", h, self.U.to(x.dtype))
        return base(x) + update


class LoraXDelta(nn.Module):
    """A LoRA-X update in weight space: ``forward(W) = W + (U_R · core · V_Rᵀ).reshape(W.shape)``.

    The same parameterisation as :class:`LoraXLinear` (frozen bases, trainable core, zero
    start), applied to the weight instead of the activations: one (m, R)·(R, n) product per
    call, which is what a host's weight wrappers need (ComfyUI's ``LoraDiff`` forms its ΔW the
    same way). ``delta()`` is float32; ``forward`` returns the weight's own dtype.

    Args:
        sub: the source weight's subspace (float32, sign-fixed: :func:`top_subspace` or a cache
            of it); its first ``rank`` directions become the frozen ``U``/``V`` buffers.
        shape: the weight's shape, ``(out, in)`` or ``(out, in, kh, kw)``; ``(out, in·kh·kw)`` must
            equal ``sub.shape``.
        rank: R, clipped to ``sub.rank``; ``None`` keeps all of ``sub``.
        full_core: train a full R×R core instead of the diagonal ΔΣ.

    Raises:
        ShapeMismatchError: ``shape`` does not flatten to ``sub.shape``.
    """

    U: torch.Tensor
    V: torch.Tensor

    def __init__(
        self, sub: Subspace, shape: tuple[int, ...], rank: int | None = None, *, full_core: bool = False
    ) -> None:
        super().__init__()
        flat = flat_shape(shape)
        if flat != sub.shape:
            raise ShapeMismatchError(
                f"LoraXDelta: a weight of shape {tuple(shape)} flattens to {flat}, but the subspace is of a "
                f"{sub.shape[0]}×{sub.shape[1]} weight; compute the subspace from this layer's weight."
            )
        s = sub.truncate(sub.rank if rank is None else rank)
        self.shape = tuple(int(d) for d in shape)
        # Own copies: a cached subspace is shared, and one made under inference mode (any ComfyUI
        # node) is an inference tensor, which autograd refuses to save for the backward pass.
        self.register_buffer("U", s.U.to(torch.float32).clone(memory_format=torch.contiguous_format))  # (m, R)
        self.register_buffer("V", s.V.to(torch.float32).clone(memory_format=torch.contiguous_format))  # (n, R)
        R = s.rank
        # Zero init, as LoraXLinear: the patched weight starts out equal to the base weight.
        self.core = nn.Parameter(torch.zeros((R, R) if full_core else (R,), dtype=torch.float32, device=s.U.device))

    @property
    def rank(self) -> int:
        return int(self.core.shape[0])

    def delta(self) -> torch.Tensor:
        """ΔW ``(m, n)`` in float32 on the bases' device (differentiable in the core)."""
        core = self.core.float()
        up = self.U * core if core.ndim == 1 else self.U @ core  # (m, R)
        return up @ self.V.T

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.device, weight.dtype).reshape(weight.shape)

    def factors(self) -> LoraXFactors:
        """The trained adapter (a detached CPU copy of the core) with this layer's shape."""
        return LoraXFactors(core=self.core.detach().to("cpu").clone(), shape=self.shape)


def add_lorax(
    model: nn.Module,
    include: Iterable[str] | Callable[[str, nn.Module], bool] = ("to_q", "to_k", "to_v", "to_out.0"),
    rank: int = 320,
    *,
    full_core: bool = False,
) -> list[str]:
    """Replace matching ``nn.Linear``/``nn.Conv2d`` submodules of ``model`` by LoRA-X wrappers, in place.

    Args:
        model: the module tree to adapt (its own parameters are frozen by the wrappers).
        include: module-name suffixes (default: the attention projections PEFT targets in SD
            UNets) or a predicate ``(qualified name, module) -> bool``.
        rank: R; full_core: see :class:`LoraXLinear`.

    Returns:
        The qualified names of the wrapped modules, in model order.

    Raises:
        OptionError: nothing matched ``include``.
    """
    if callable(include):
        wanted = include
    else:
        suffixes = tuple(include)

        def wanted(name: str, module: nn.Module) -> bool:
            return any(name == s or name.endswith("." + s) for s in suffixes)

    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | nn.Conv2d) and not isinstance(module, _LoraXBase) and wanted(name, module)
    ]
    if not chosen:
        raise OptionError(
            f"add_lorax: no nn.Linear/nn.Conv2d module of {type(model).__name__} matches include={include!r}; "
            "pass the module-name suffixes of the layers to adapt."
        )
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper: nn.Module
        if isinstance(module, nn.Linear):
            wrapper = LoraXLinear(module, rank, full_core=full_core)
        else:
            wrapper = LoraXConv2d(module, rank, full_core=full_core)
        setattr(parent, child, wrapper)
    return [name for name, _ in chosen]


def collect_lorax(model: nn.Module, prefix: str = "") -> dict[str, LoraXFactors]:
    """The trained LoRA-X adapter of every wrapped module, keyed by model key.

    The key is ``f"{prefix}{name}.weight"`` where ``name`` is the wrapper's qualified name, so
    ``prefix="diffusion_model."`` on a UNet gives ComfyUI model keys.

    Raises:
        OptionError: the model contains no LoRA-X wrapper.
    """
    found = {
        f"{prefix}{name}.weight": module.factors()
        for name, module in model.named_modules()
        if isinstance(module, _LoraXBase)
    }
    if not found:
        raise OptionError(
            f"collect_lorax: {type(model).__name__} has no LoraXLinear/LoraXConv2d module; wrap layers with "
            "add_lorax (or the wrapper classes) and train them first."
        )
    return found
