"""The project's one exception family.

Every user-facing failure is a :class:`LoraxError` (or a subclass) whose message names
*where* (the layer, file or option), *what* (the offending value) and *the fix*. Hosts
(the ComfyUI nodes, the command line) add their own name in front with :func:`with_context`
and show the message as one line; they never show a torch traceback for bad input.
"""

from __future__ import annotations

__all__ = [
    "CacheError",
    "FormatError",
    "IncompatibleBaseError",
    "LayerSkippedError",
    "LoraxError",
    "NonFiniteError",
    "NothingTransferableError",
    "OptionError",
    "OutputError",
    "OutputExistsError",
    "RankError",
    "ShapeMismatchError",
    "UnsafeFileError",
    "with_context",
]


class LoraxError(Exception):
    """Base class: a problem with the user's input, files or options, told in one line."""


class OptionError(LoraxError, ValueError):
    """An option value is out of range or two options contradict each other."""


class RankError(OptionError):
    """A requested rank is impossible for a layer (e.g. larger than the layer's dimensions)."""


class ShapeMismatchError(LoraxError):
    """A LoRA layer's factors do not fit the base weight they are meant for."""


class FormatError(LoraxError):
    """A LoRA or model file is unreadable, corrupt, or in no format the pack understands."""


class UnsafeFileError(FormatError):
    """A file would need unpickling to read (``.ckpt``/``.pt``/``.bin``); refused by default."""


class NonFiniteError(LoraxError, ValueError):
    """A tensor holds NaN or ±Inf, or the maths on it overflowed (the message names the tensor).

    Raised for base weights (a LoRA layer that holds such values is reported as skipped
    instead) and as the last check before a file is written, so no NaN/Inf ever reaches an
    output.
    """


class IncompatibleBaseError(LoraxError):
    """The LoRA does not belong to the given source model (wrong base family, missing keys)."""


class NothingTransferableError(LoraxError):
    """Every layer of the LoRA was skipped, so the result would be an empty adapter."""


class LayerSkippedError(LoraxError):
    """``strict`` mode: a layer would have been skipped (the message names it and says why)."""


class OutputExistsError(LoraxError):
    """The output file already exists and overwriting was not asked for.

    The core's message ends with :data:`FIX` (it speaks of the option, not of a flag or a
    widget); each front end replaces it with its own wording (the CLI: ``pass --overwrite``).
    """

    FIX = "allow overwriting"


class OutputError(FormatError):
    """An output file cannot be written: a folder or too long a name in its place, a missing or
    read-only folder, a full disk. Nothing is left behind when this is raised.

    A :class:`FormatError` subclass because bad output paths raised ``FormatError`` before this
    class existed.
    """


class CacheError(LoraxError):
    """The subspace cache directory is unusable (not writable, not a directory).

    The core's message ends with :data:`FIX` (the option, not a flag or a widget); each front
    end replaces it with its own wording (the CLI: ``pass --no-cache``).
    """

    FIX = "turn the subspace cache off"


def with_context(error: LoraxError, context: str) -> LoraxError:
    """Return a new error of the same type whose message starts with ``context``.

    Used once, at a public entry point (a node, a CLI command), so the user sees e.g.
    ``"Transfer LoRA (LoRA-X): layer ...: ..."``. Raise the result ``from None``.
    """
    return type(error)(f"{context}: {error}")
