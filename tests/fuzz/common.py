"""What the fuzz harnesses share: the atheris entry point and the rule they enforce.

Each harness is a script: `python tests/fuzz/fuzz_X.py --model MODEL_DIR CORPUS_DIR [libFuzzer flags]`.
Only edgemoe's named errors (edgemoe.errors.EdgeMoEError) may leave a reader; any other
exception, a crash or a hang is reported by libFuzzer with the input that caused it.
seeds.py writes MODEL_DIR and the corpora from checkpoints the tests make.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris

# fuzz_experts inputs: a manifest's "experts" section (JSON), SEP, an experts file
SEP = b"\n--experts.bin--\n"


def model_arg(argv: list[str]) -> tuple[Path, list[str]]:
    """Takes `--model DIR` out of argv (libFuzzer gets the rest)."""
    if "--model" not in argv:
        sys.exit(f"usage: {argv[0]} --model MODEL_DIR CORPUS_DIR [libFuzzer flags] (seeds.py writes both)")
    i = argv.index("--model")
    model = Path(argv[i + 1]).resolve()
    return model, argv[:i] + argv[i + 2 :]


def scratch_dir() -> Path:
    """A private directory on the real filesystem (the store wants O_DIRECT, which tmpfs refuses)."""
    base = os.environ.get("EDGEMOE_FUZZ_TMP") or None
    return Path(tempfile.mkdtemp(prefix="edgemoe-fuzz-", dir=base))


def run(one_input: Callable[[bytes], None], argv: list[str]) -> None:
    atheris.Setup(argv, one_input)
    atheris.Fuzz()
