"""The tables of docs/gguf.md: GGUF files made by llama.cpp's converter and quantizer from tiny
checkpoints, converted by edgemoe, and the logits of both engines on the same file.

    python tools/gguf_parity.py --work /tmp/gguf-parity

Per architecture and GGUF type: the median and the largest (over 20 prompt positions) of the
largest logit difference relative to the largest logit, and the share of positions where the two
engines' top token differs. A wider Mixtral (hidden 256, expert intermediate 512: rows whole
K-quant super-blocks of 256) shows the types that are quantized again, with the relative RMS error
the conversion reports per tensor class. Needs llama-cpp-python (pip install '.[bench]').
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import tiny  # noqa: E402

import edgemoe  # noqa: E402
from edgemoe import models  # noqa: E402
from edgemoe.bench import llama_cpp as peers  # noqa: E402
from edgemoe.converters.convert import convert  # noqa: E402
from edgemoe.runtime.paths import cache_root  # noqa: E402

# what llama.cpp's converter and graph need of the tiny models (tests/test_gguf.py says why); gpt-oss's
# SwiGLU alpha and limit fixed at the released values, its YaRN with the correction range llama.cpp rounds
YARN_V3 = dict(rope_type="yarn", rope_theta=1e4, factor=8.0, original_max_position_embeddings=32)
YARN_OSS = dict(rope_type="yarn", rope_theta=1.5e5, factor=8.0, original_max_position_embeddings=32, beta_fast=32.0)
OVERRIDES = {
    "qwen2_moe": {"mlp_only_layers": []},
    "olmoe": {"num_key_value_heads": 4},
    "deepseek_v2": {"q_lora_rank": 48, "n_group": 1, "topk_group": 1, "topk_method": "greedy"},
    "deepseek_v3": {"scoring_func": "sigmoid", "rope_parameters": dict(YARN_V3, mscale=0.8, mscale_all_dim=0.8)},
    "gpt_oss": {"swiglu_alpha": 1.702, "swiglu_limit": 7.0, "rope_parameters": YARN_OSS},
}
WIDE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2, seed=0)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def compare(path: Path, dst: Path) -> tuple[dict, str]:
    m = convert(path, dst, overwrite=True, progress=False)
    model = edgemoe.load(dst)
    ids = np.random.default_rng(3).integers(3, model.config.vocab_size, size=20).tolist()
    ours, theirs = model.logits(ids), llama_logits(path, ids)
    rel = np.abs(ours - theirs).max(axis=1) / np.abs(theirs).max()
    top = float(np.mean(ours.argmax(1) != theirs.argmax(1)))
    return m, f"{np.median(rel):.1e} | {rel.max():.1e} | {top:.0%}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="folder for the checkpoints, GGUF files and conversions")
    ap.add_argument("--arch", action="append", help="only this architecture (repeatable); no wide Mixtral table")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shared = cache_root() / "peers"
    shared.mkdir(parents=True, exist_ok=True)

    print("| architecture | GGUF type | edgemoe experts | median | max | top token differs |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    archs = [a for a in tiny.ARCHS if models.ALIASES.get(a) in models.GGUF_ALIASES.values()]
    for arch in [a for a in archs if not args.arch or a in args.arch]:
        hf = work / f"hf-{arch}"
        if not (hf / "config.json").exists():
            tiny.make_checkpoint(arch, hf, **OVERRIDES.get(arch, {}))
        made = peers.hf_to_ggufs(hf, {t: work / f"{arch}-{t.upper()}.gguf" for t in ("f32", "f16", "q8_0")}, shared)
        files = {t.upper(): p for t, p in made.items()}
        files["Q4_0"] = peers.quantize_gguf(made["f32"], work / f"{arch}-Q4_0.gguf", "Q4_0")
        for kind, path in files.items():
            m, row = compare(path, work / f"em-{arch}-{kind}")
            q = m["quantization"]
            print(
                f"| {arch} | {kind} | {q['bits']} bits, {q['float_dtype'] if q['bits'] == 16 else 'carried over'} | {row} |"
            )
    if args.arch:
        return 0

    hf = work / "hf-mixtral-wide"
    if not (hf / "config.json").exists():
        tiny.make_checkpoint("mixtral", hf, **WIDE)
    f32 = peers.hf_to_gguf(hf, work / "wide-F32.gguf", shared, "f32")
    print()
    print(
        "| GGUF type | edgemoe experts | experts.gate error | experts.down error | median | max | top token differs |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for kind in ("Q4_0", "Q4_K_M", "Q6_K", "Q2_K", "IQ4_NL"):
        path = peers.quantize_gguf(f32, work / f"wide-{kind}.gguf", kind)
        m, row = compare(path, work / f"em-wide-{kind}")
        t = m["source"]["tensors"]

        def err(cls: str) -> str:
            s = t[cls]
            types = "/".join(s["gguf_types"])
            return f"{types}: exact" if s["exact"] == s["tensors"] else f"{types}: {s['relative_rms_error']:.1e}"

        print(f"| {kind} | {m['quantization']['bits']} bits | {err('experts.gate')} | {err('experts.down')} | {row} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
