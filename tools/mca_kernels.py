"""How many bytes of weights per cycle the NEON kernels' inner loops can stream, by llvm-mca.

Compiles native/kernels_neon*.cpp for each core with -S and EDGEMOE_MCA (which marks each
kernel's inner loop as an llvm-mca region), runs llvm-mca on them with that core's scheduling
model, and prints a markdown table: per kernel and core the bytes of weights per cycle of one
core, and that times the board's cores and clock against the board's memory bandwidth
(docs/arm64.md, "Is it fast enough"). Needs g++-aarch64-linux-gnu and llvm (llvm-mca; the
newest installed is used, or LLVM_MCA=path).

    python tools/mca_kernels.py            # the table
    python tools/mca_kernels.py --raw      # every region: instructions, cycles, throughput
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["kernels_neon.cpp", "kernels_neon_dotprod.cpp", "kernels_neon_i8mm.cpp"]
ITERATIONS = 300


@dataclass(frozen=True)
class Core:
    board: str
    gcc_cpu: str  # -mcpu for aarch64-linux-gnu-g++ (GCC 12 knows no cortex-x4: cortex-x2 is its v9 core)
    mca_cpu: str  # llvm-mca's model; LLVM has no A76/A78 model of its own (see docs/arm64.md)
    level: int  # what the run-time dispatch picks there: 0 neon, 1 dotprod, 2 i8mm
    cores: int
    ghz: float
    gbps: float | None  # sustained memory bandwidth, GB/s


CORES = [
    Core("Pi 4: 4x A72 @1.8 GHz", "cortex-a72", "cortex-a72", 0, 4, 1.8, 4.5),
    Core("Pi 5: 4x A76 @2.4 GHz", "cortex-a76", "neoverse-n1", 1, 4, 2.4, 11.0),
    Core("Orin Nano: 6x A78AE @1.5 GHz", "cortex-a78ae", "neoverse-n1", 1, 6, 1.5, 51.0),
    Core("1x Cortex-X4 @3.3 GHz", "cortex-x2", "cortex-x4", 2, 1, 3.3, None),
]


@dataclass(frozen=True)
class Region:
    name: str
    instructions: float  # per iteration
    cycles: float  # per iteration, simulated
    rthroughput: float  # per iteration, resources alone


def llvm_mca() -> str:
    if os.environ.get("LLVM_MCA"):
        return os.environ["LLVM_MCA"]
    found = sorted(glob.glob("/usr/lib/llvm-*/bin/llvm-mca"), key=lambda p: int(re.findall(r"llvm-(\d+)", p)[0]))
    if found:
        return found[-1]
    path = shutil.which("llvm-mca")
    if not path:
        raise SystemExit("llvm-mca not found: apt-get install llvm (or set LLVM_MCA)")
    return path


def assemble(core: Core, src: str, out: Path) -> Path:
    """native/src compiled for core to assembly that llvm-mca reads."""
    s = out / f"{core.gcc_cpu}-{src}.s"
    cmd = ["aarch64-linux-gnu-g++", "-std=c++17", "-O3", "-DEDGEMOE_MCA", f"-mcpu={core.gcc_cpu}"]
    subprocess.run([*cmd, f"-I{ROOT / 'native'}", "-S", str(ROOT / "native" / src), "-o", str(s)], check=True)
    text = s.read_text()
    # GCC writes movi's byte immediate sign-extended, which LLVM's assembler refuses; and
    # llvm-mca finds its markers in '#' comments only
    text = re.sub(r"(movi\s+v\d+\.(?:16b|8b),\s*)0xffffffffffffff([0-9a-f]{2})", r"\g<1>0x\2", text)
    s.write_text(text.replace("// LLVM-MCA-", "# LLVM-MCA-"))
    return s


def regions(core: Core, asm: Path, mca: str) -> dict[str, Region]:
    cmd = [mca, "-mtriple=aarch64", f"-mcpu={core.mca_cpu}", "-mattr=+dotprod,+i8mm", f"-iterations={ITERATIONS}"]
    text = subprocess.run([*cmd, str(asm)], check=True, capture_output=True, text=True).stdout
    found = {}
    for block in text.split("Code Region - ")[1:]:
        name = block.split()[0]
        num = {k: float(re.search(rf"{k}:\s+([\d.]+)", block)[1]) for k in ("Instructions", "Total Cycles")}
        rth = float(re.search(r"Block RThroughput:\s+([\d.]+)", block)[1])
        found[name] = Region(name, num["Instructions"] / ITERATIONS, num["Total Cycles"] / ITERATIONS, rth)
    return found


def weight_bytes(name: str) -> float:
    """Bytes of weights one iteration of the named region reads."""
    if m := re.fullmatch(r"decode_b(\d)_rows(\d)_cpg\d_level\d", name):
        return int(m[2]) * 4 * int(m[1]) * 4  # rows x 4 blocks x a block's bytes
    if m := re.fullmatch(r"rows_b(\d)_tokens\d+", name):
        return int(m[1]) * 4  # one block of one row
    if m := re.fullmatch(r"float_kind(\d)_tokens\d+", name):
        return 16 * (4 if m[1] == "0" else 2)
    if m := re.fullmatch(r"gemm_rows(\d)_tokens\d+", name):
        return int(m[1]) * 16  # f32 tile, from cache
    raise ValueError(name)


def kernels(level: int) -> list[tuple[str, str]]:
    """(label, region) for the kernels of the table, at the dispatch's level."""

    def decode(bits: int, cpg: int) -> str:
        # the i8mm level: usdot for 8-bit codes, the other widths dotprod's block dots in the unscaled loop
        return f"decode_b{bits}_rows{4 if bits == 4 and level > 0 else 2}_cpg{cpg}_level{level}"

    rows = [(f"decode INT{b}, g64 (T=1)", decode(b, 2)) for b in (4, 8, 2, 3)]
    rows += [("decode INT4, g32 (T=1)", decode(4, 1))]
    rows += [(f"{k} rows (T=1)", f"float_kind{i}_tokens1") for i, k in ((1, "f16"), (2, "bf16"), (0, "f32"))]
    rows += [("INT4 rows, 4 tokens (T=2..11)", "rows_b4_tokens4")]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", action="store_true", help="print every region's figures")
    args = ap.parse_args()
    mca = llvm_mca()
    version = subprocess.run([mca, "--version"], capture_output=True, text=True).stdout.split("version")[1].split()[0]
    gcc = subprocess.run(["aarch64-linux-gnu-g++", "-dumpversion"], capture_output=True, text=True).stdout.strip()
    per_core: dict[Core, dict[str, Region]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for core in CORES:
            per_core[core] = {}
            for src in SOURCES:
                per_core[core].update(regions(core, assemble(core, src, Path(tmp)), mca))
    if args.raw:
        for core, found in per_core.items():
            print(f"## {core.board} (gcc -mcpu={core.gcc_cpu}, llvm-mca -mcpu={core.mca_cpu})")
            for r in sorted(found.values(), key=lambda r: r.name):
                b = weight_bytes(r.name)
                print(
                    f"{r.name:40s} {r.instructions:7.1f} instr {r.cycles:7.1f} cyc {r.rthroughput:7.1f} rthr"
                    f"  {b / r.cycles:5.2f} B/cyc"
                )
        return
    print(
        f"llvm-mca {version} ({ITERATIONS} iterations), aarch64-linux-gnu-g++ {gcc} -O3; "
        "B/cyc: bytes of weights per cycle of one core; GB/s: that x cores x GHz (x: of the board's bandwidth)\n"
    )
    print("| kernel | " + " | ".join(c.board for c in CORES) + " |")
    print("| --- | " + " | ".join("---" for _ in CORES) + " |")
    print(
        "| level, llvm-mca model | "
        + " | ".join(f"{['neon', 'dotprod', 'i8mm'][c.level]}, {c.mca_cpu}" for c in CORES)
        + " |"
    )
    print("| memory bandwidth | " + " | ".join(f"{c.gbps:g} GB/s" if c.gbps else "-" for c in CORES) + " |")
    for label, _ in kernels(0):
        cells = []
        for core in CORES:
            name = dict(kernels(core.level))[label]
            r = per_core[core][name]
            bpc = weight_bytes(name) / r.cycles
            gbs = bpc * core.cores * core.ghz
            share = f" ({gbs / core.gbps:.2f}x)" if core.gbps else ""
            cells.append(f"{bpc:.2f} B/cyc, {gbs:.1f} GB/s{share}")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
