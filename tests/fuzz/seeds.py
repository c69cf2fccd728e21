"""Seed corpora for the fuzz harnesses, from real files: tiny checkpoints made with
transformers (tests/tiny.py) and converted by edgemoe.

    python tests/fuzz/seeds.py OUT
    OUT/model/                   a converted model (4-bit, with 2-bit fallback copies) the manifest harness opens
    OUT/corpus/manifest/         manifest.json of each conversion
    OUT/corpus/experts/          each conversion's "experts" section and experts.bin (fuzz_experts.SEP between)
    OUT/corpus/safetensors/      backbones, a checkpoint shard, a three-tensor file
    OUT/corpus/config/           config.json of the tiny checkpoints (every architecture) and of
                                 released models (tests/published_configs.py)
    OUT/corpus/gguf/             GGUF files written by the gguf package's own writer: F32, F16
                                 and Q8_0 tensors, strings, arrays and a tokenizer's metadata
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: tiny.py
sys.path.insert(0, str(HERE))

# (name, convert keywords): float, asymmetric, symmetric (kind 4), mixed bitwidths
CONVERSIONS = [
    ("q4-fallback", {"bits": 4, "fallback_bits": 2}),
    ("f16", {"bits": 16}),
    ("q8-sym", {"bits": 8, "symmetric": True, "group_size": 32}),
    ("q3", {"bits": 3, "group_size": 32}),
    ("mixed", {"bits": 4, "bits_map": {(0, 0): 2, (0, 1): 8, (1, 2): 16, (1, 3): 3}}),
]


def write_seeds(out: Path) -> Path:
    import tiny
    from common import SEP

    from edgemoe.converters.convert import convert
    from edgemoe.format.safetensors import SafetensorsFile, write_safetensors

    out = Path(out)
    corpus = out / "corpus"
    for sub in ("manifest", "experts", "safetensors", "gguf", "config"):
        (corpus / sub).mkdir(parents=True, exist_ok=True)
    ckpt = tiny.make_checkpoint("mixtral", out / "checkpoint", shard_size="64KB")
    for name, kw in CONVERSIONS:
        dst = out / "converted" / name
        convert(ckpt, dst, progress=False, overwrite=True, **kw)
        manifest = (dst / "manifest.json").read_bytes()
        (corpus / "manifest" / name).write_bytes(manifest)
        section = json.dumps(json.loads(manifest)["experts"]).encode()
        (corpus / "experts" / name).write_bytes(section + SEP + (dst / "experts.bin").read_bytes())
        (corpus / "safetensors" / f"backbone-{name}").write_bytes((dst / "backbone.safetensors").read_bytes())
    shards = sorted(ckpt.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    (corpus / "safetensors" / "checkpoint-shard").write_bytes(shards[0].read_bytes())
    st = SafetensorsFile(out / "converted" / "f16" / "backbone.safetensors")
    small = {n: (st.read(n), st.dtype(n)) for n in sorted(st.names(), key=st.nbytes)[:3]}
    write_safetensors(corpus / "safetensors" / "three-tensors", small, metadata={"format": "pt"})
    write_gguf_seeds(corpus / "gguf")
    write_config_seeds(corpus / "config")
    model = out / "model"
    if model.exists():
        shutil.rmtree(model)
    shutil.copytree(out / "converted" / "q4-fallback", model)
    return out


def write_config_seeds(out: Path) -> None:
    """config.json as transformers writes it for each tiny architecture, and as released."""
    import published_configs
    import tiny

    for arch in tiny.ARCHS:
        (out / f"tiny-{arch}").write_text(tiny.tiny_config(arch).to_json_string())
    for name, (config, *_) in published_configs.PUBLISHED.items():
        (out / f"published-{name}").write_text(json.dumps(config, indent=2))


def write_gguf_seeds(out: Path) -> None:
    """Small GGUF files in the layout llama.cpp writes (the gguf package's writer), with the
    metadata kinds the import reads: scalars, strings, string and number arrays."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    for name, qtype in (
        ("f32", None),
        ("f16", gguf.GGMLQuantizationType.F16),
        ("q8_0", gguf.GGMLQuantizationType.Q8_0),
    ):
        w = gguf.GGUFWriter(out / name, "llama")
        w.add_block_count(1)
        w.add_embedding_length(32)
        w.add_expert_count(2)
        w.add_expert_used_count(1)
        w.add_tokenizer_model("gpt2")
        w.add_token_list(["a", "b", "ab", "<s>"])
        w.add_token_types([1, 1, 1, 3])
        w.add_token_merges(["a b"])
        w.add_bos_token_id(3)
        w.add_chat_template("{{ messages[0]['content'] }}")
        for t in ("token_embd.weight", "blk.0.ffn_gate_exps.weight", "output_norm.weight"):
            shape = (2, 4, 32) if "exps" in t else (32,) if "norm" in t else (4, 32)
            x = rng.standard_normal(shape).astype(np.float32)
            if qtype is None or "norm" in t:
                w.add_tensor(t, x)
            elif qtype == gguf.GGMLQuantizationType.F16:
                w.add_tensor(t, x.astype(np.float16))
            else:
                w.add_tensor(t, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/fuzz/seeds.py OUT")
    print(write_seeds(Path(sys.argv[1])))
