"""routing.json: a model's routing profile (written by `edgemoe profile`, read by the runtime's
warm start and table predictor). Its statistics are computed in edgemoe.planning.routing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelDirectoryError

ROUTING_FILE = "routing.json"
ROUTING_VERSION = 1


def save_routing(model_dir: str | Path, doc: dict[str, Any]) -> Path:
    path = Path(model_dir) / ROUTING_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    tmp.replace(path)
    return path


def load_routing(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / ROUTING_FILE
    if not path.exists():
        raise ModelDirectoryError(
            f"{model_dir} has no {ROUTING_FILE}: profile the model first with "
            f"`edgemoe profile {model_dir} --calib TEXT_FILE`"
        )
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirectoryError(
            f"{path} cannot be read ({e}): profile the model again with `edgemoe profile {model_dir}`"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != "edgemoe-routing":
        raise ModelDirectoryError(f"{path} is not an edgemoe routing file: profile the model again")
    if doc.get("version", 0) > ROUTING_VERSION:
        raise ModelDirectoryError(
            f"{path} is routing version {doc['version']}, this edgemoe reads up to "
            f"{ROUTING_VERSION}: upgrade edgemoe or profile the model again"
        )
    return doc


def load_usage(model_dir: str | Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """How often calibration text routed to each expert ([layers, experts] float64, the
    experts file's shape), from routing.json; None without one. A file it cannot use raises
    ModelDirectoryError saying why."""
    path = Path(model_dir) / ROUTING_FILE
    if not path.exists():
        return None
    try:
        usage = np.asarray(load_routing(model_dir)["usage"], np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelDirectoryError(f"{path} has no usable usage table ({e!r}): profile the model again") from None
    if usage.shape != shape:
        raise ModelDirectoryError(f"{path}'s usage is {usage.shape}, the experts file {shape}: profile the model again")
    return usage
