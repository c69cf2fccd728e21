"""Write a small random-weight Mixtral checkpoint (sharded bf16 + tokenizer) to a folder.

Usage: python tools/make_tiny_checkpoint.py DST [--arch mixtral|qwen2_moe|qwen3_moe|olmoe]
Needs torch and transformers (pip install '.[test]').
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import tiny  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dst")
    ap.add_argument("--arch", default="mixtral", choices=tiny.ARCHS)
    args = ap.parse_args()
    path = tiny.make_checkpoint(args.arch, Path(args.dst))
    print(f"wrote a tiny {args.arch} checkpoint to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
