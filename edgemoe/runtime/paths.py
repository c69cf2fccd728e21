"""Where edgemoe keeps what it makes for itself on this machine (converted default model,
benchmark files, a device's copies of the experts it serves in a cluster)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$EDGEMOE_CACHE, else $XDG_CACHE_HOME/edgemoe, else ~/.cache/edgemoe."""
    if os.environ.get("EDGEMOE_CACHE"):
        return Path(os.environ["EDGEMOE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "edgemoe"
