"""edgemoe: Mixture-of-Experts inference with experts streamed from flash into a RAM cache."""
from . import _core
from .errors import (BudgetError, CheckpointError, CorruptExpertError, EdgeMoEError, ModelDirectoryError,
                     TokenizerError, UnsupportedArchitectureError)
from .model import Model, load

__version__ = "0.1.0"

__all__ = ["load", "Model", "EdgeMoEError", "CheckpointError", "UnsupportedArchitectureError",
           "ModelDirectoryError", "CorruptExpertError", "BudgetError", "TokenizerError", "__version__"]
