"""The default model: a small Mixtral trained by this project (tools/train), shipped
in the package as an ordinary Hugging Face checkpoint and converted on first use."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from ..converters.convert import convert
from ..errors import EdgeMoEError
from ..runtime.paths import cache_root
from .routing import profile_model

SHIPPED = Path(__file__).parent.parent / "default_model"
DEFAULT_BITS = 8
ROUTING_TOKENS = 12_000  # calibration tokens traced on first use (about ten seconds)


CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def _fingerprint(src: Path) -> str:
    """Changes whenever the shipped checkpoint does (its config, weights' sizes and headers,
    tokenizer); not when the texts or notes beside it do."""
    h = hashlib.sha256()
    for name in CHECKPOINT_FILES:
        f = src / name
        if f.is_file():
            h.update(name.encode())
            h.update(str(f.stat().st_size).encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 16))
    return h.hexdigest()[:12]


def shipped_text(given: str | os.PathLike[str] | None, model: str | None, name: str, missing: str) -> Path:
    """The text file a verb works on: the one given; else, when no model was named (the
    default model), the shipped `name` (calib.txt, test.txt); else EdgeMoEError(missing)."""
    if given is not None:
        return Path(given)
    if model is None and (SHIPPED / name).is_file():
        return SHIPPED / name
    raise EdgeMoEError(missing)


def default_model_path(bits: int = DEFAULT_BITS, progress: bool = True) -> Path:
    """The converted default model, converting the shipped checkpoint on first use."""
    if not (SHIPPED / "config.json").exists():
        raise EdgeMoEError(
            f"this installation carries no default model ({SHIPPED} is missing): "
            "name a converted model directory instead"
        )
    dst = cache_root() / f"default-{bits}bit-{_fingerprint(SHIPPED)}"
    if not (dst / "manifest.json").exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        convert(SHIPPED, dst, bits=bits, progress=progress, overwrite=True)
    if not (dst / "routing.json").exists():
        # routing statistics and the prefetch table, traced on the shipped validation text
        profile_model(dst, SHIPPED / "calib.txt", max_tokens=ROUTING_TOKENS, log=sys.stderr if progress else None)
    return dst
