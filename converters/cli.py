"""`edgemoe convert SRC -o DST`: a thin command over converters.convert.convert."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from edgemoe.errors import EdgeMoEError

from .convert import convert


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgemoe convert",
        description="Convert a Hugging Face MoE checkpoint (safetensors) into an edgemoe model directory.")
    p.add_argument("src", help="checkpoint folder (config.json + *.safetensors + tokenizer files)")
    p.add_argument("-o", "--output", required=True, metavar="DST", help="model directory to create")
    p.add_argument("--bits", type=int, choices=(16, 8, 4), default=16,
                   help="expert bitwidth: 16 keeps the checkpoint's floats, 8/4 group-quantize (default 16)")
    p.add_argument("--backbone-bits", type=int, choices=(16, 8, 4), default=None,
                   help="bitwidth of the backbone's attention/MLP/output matrices (routers, embeddings and norms "
                        "stay as stored); default 16 with --bits 16, else 8")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=64,
                   help="columns per quantization group (default 64)")
    p.add_argument("--symmetric", action="store_true", help="symmetric quantization (default asymmetric)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.monotonic()
    try:
        m = convert(args.src, args.output, bits=args.bits, group_size=args.group_size,
                    symmetric=args.symmetric, progress=not args.quiet, overwrite=args.force,
                    backbone_bits=args.backbone_bits)
    except EdgeMoEError as e:
        print(f"edgemoe convert: error: {e}", file=sys.stderr)
        return 2
    ex = m["experts"]
    if not args.quiet:
        print(f"wrote {args.output}: {m['architecture']}, {len(ex['blobs'])} experts at {args.bits} bits "
              f"({ex['file_bytes'] / 1e6:.1f} MB) + backbone at {m['backbone']['bits']} bits "
              f"({m['backbone']['bytes'] / 1e6:.1f} MB) "
              f"in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
