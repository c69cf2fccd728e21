"""edgemoe: Mixture-of-Experts inference with experts streamed from flash into a RAM cache."""

from . import _core as _core  # the native core, re-exported
from .errors import (
    BudgetError,
    CheckpointError,
    CorruptExpertError,
    EdgeMoEError,
    ModelDirectoryError,
    TokenizerError,
    UnsupportedArchitectureError,
)
from .runtime.engine import Model, load
from .runtime.options import StreamOptions

__version__ = "0.1.0"

__all__ = [
    "load",
    "Model",
    "StreamOptions",
    "EdgeMoEError",
    "CheckpointError",
    "UnsupportedArchitectureError",
    "ModelDirectoryError",
    "CorruptExpertError",
    "BudgetError",
    "TokenizerError",
    "__version__",
]
