"""edgemoe: Mixture-of-Experts inference with experts streamed from flash."""
from . import _core

__version__ = "0.1.0"
