"""Sizes from config.json alone (planning before a download): the closed-form QMatrix and blob
sizes against what the format writes, the size model against converted tiny checkpoints and
against the published parameter counts of real models, and `edgemoe info config.json`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from published_configs import PUBLISHED

import edgemoe
from edgemoe.cli import main
from edgemoe.format import quant
from edgemoe.models import SUPPORTED as ARCHS
from edgemoe.models.sizes import SIZEABLE, size_model
from edgemoe.planning.fit import plan_config

GRID = [(r, c) for r in (1, 32, 96) for c in (64, 128, 384)]


@pytest.mark.parametrize("bits", quant.QBITS)
@pytest.mark.parametrize("group_size", quant.GROUP_SIZES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_qmatrix_size_is_what_quantize_matrix_writes(bits, group_size, symmetric):
    for rows, cols in GRID:
        if cols % group_size:
            continue
        w = np.zeros((rows, cols), np.float32)
        written = quant.quantize_matrix(w, bits, group_size, symmetric).nbytes
        assert quant.qmatrix_nbytes(rows, cols, bits, group_size, symmetric) == written, (rows, cols)


@pytest.mark.parametrize("kind", sorted(quant.FLOAT_KINDS))
def test_float_matrix_size_is_what_float_matrix_writes(kind):
    for rows, cols in GRID:
        assert quant.float_matrix_nbytes(rows, cols, kind) == quant.float_matrix(np.zeros((rows, cols)), kind).nbytes


@pytest.mark.parametrize("bits", [16, 8, 4, 3, 2])
def test_blob_size_is_what_pack_expert_blob_makes(bits):
    for hidden, inter in ((64, 96), (128, 320), (96, 64)):
        shapes = ((inter, hidden), (inter, hidden), (hidden, inter))
        if bits == 16:
            mats = [quant.float_matrix(np.zeros(s, np.float32), "bf16") for s in shapes]
        else:
            mats = [quant.quantize_matrix(np.zeros(s, np.float32), bits, 32, False) for s in shapes]
        blob = quant.pack_expert_blob(0, 0, *mats)
        assert quant.expert_blob_nbytes(*(m.nbytes for m in mats)) == blob.nbytes


# ---------------------------------------------------------------- the size model against conversions


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    """Each tiny architecture converted with 16-bit experts and with 4-bit experts (8-bit backbone)."""
    from edgemoe.converters.convert import convert

    root = tmp_path_factory.mktemp("plan")
    out = {}
    for arch in ARCHS:
        for bits in (16, 4):
            dst = root / f"{arch}-{bits}"
            convert(tiny_checkpoint(arch), dst, bits=bits, progress=False)
            out[arch, bits] = (tiny_checkpoint(arch), dst)
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bits", [16, 4])
def test_a_plan_from_config_is_what_the_conversion_holds(converted, arch, bits):
    src, dst = converted[arch, bits]
    plan = plan_config(json.loads((src / "config.json").read_text()), context_tokens=40)
    e = plan["experts"][bits]
    m = edgemoe.load(dst, memory_budget=e["min_budget"])  # the smallest budget the plan names is accepted
    info = m.info()
    assert info["expert_bytes"] == e["bytes"] and info["min_memory_budget"] == e["min_budget"]
    assert m.backbone_bytes + info["file_embedding_bytes"] == plan["backbone_bytes"][e["backbone_bits"]]
    assert m.backbone_bytes == e["memory_terms"]["backbone"]
    assert m.memory_needed(40) == e["min_memory_limit"]


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_counts_are_the_checkpoints(tiny_checkpoint, arch):
    from edgemoe.converters.hf import Checkpoint

    ckpt = Checkpoint(tiny_checkpoint(arch))
    stored = sum(math.prod(f.shape(name)) for name, f in ckpt.tensors.items() if "rotary_emb" not in name)
    assert size_model(ckpt.config).params()["total"] == stored


# ---------------------------------------------------------------- released models


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_ones(name):
    config, total, active, with_embedding = PUBLISHED[name]
    p = size_model(config).params()
    counted = p["active"] if with_embedding else p["active"] - p["embedding"]
    assert abs(p["total"] / total - 1) < 0.01, (name, p["total"], total)
    # published active counts are rounded to 0.1B: DeepSeek-V2-Lite's 2.45B is published as 2.4B
    assert abs(counted / active - 1) < 0.025, (name, counted, active)


def test_qwen3_non_embedding_count_matches_its_card():
    config, *_ = PUBLISHED["Qwen3-30B-A3B"]
    p = size_model(config).params()
    assert abs((p["total"] - 2 * p["embedding"]) / 29.9e9 - 1) < 0.01  # "Non-Embedding: 29.9B", untied head


@pytest.fixture()
def config_file(tmp_path):
    def write(config: dict, name: str = "config.json"):
        path = tmp_path / name
        path.write_text(json.dumps(config))
        return path

    return write


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_info_sizes_a_config_it_may_not_run(name, config_file, capsys):
    config, *_ = PUBLISHED[name]
    path = config_file(config)
    assert main(["info", str(path), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    runs = config["model_type"] in ARCHS
    assert plan["supported"] is runs and (plan["why_not"] is None) is runs
    e4 = plan["experts"]["4"]
    assert 0 < e4["min_budget"] < e4["min_memory_limit"]
    assert e4["min_budget"] == plan["top_k"] * -(-e4["expert_bytes"] // 4096) * 4096
    assert plan["experts"]["16"]["bytes"] > plan["experts"]["8"]["bytes"] > e4["bytes"] > plan["experts"]["2"]["bytes"]
    assert main(["info", str(path.parent)]) == 0  # a folder holding only config.json
    text = capsys.readouterr().out
    assert ("edgemoe runs it" in text) is runs and ("cannot run" in text) is not runs
    assert "min memory limit" in text and "256 tokens" in text


def test_the_context_adds_what_the_runtime_counts_for_it(config_file, capsys):
    path = config_file(PUBLISHED["Mixtral-8x7B"][0])
    limits = {}
    for T in (256, 1024):
        assert main(["info", str(path), "--json", "--context", str(T)]) == 0
        limits[T] = json.loads(capsys.readouterr().out)["experts"]["4"]["memory_terms"]
    grown = {k for k in limits[256] if limits[1024][k] != limits[256][k]}
    assert grown == {"kv_cache", "prefill_scores", "moe_scratch"}
    # Mixtral: 2 x 32 layers x 8 kv heads x 128 values of 2 bytes (float16) per token
    assert limits[1024]["kv_cache"] - limits[256]["kv_cache"] == 768 * 2 * 32 * 8 * 128 * 2


def test_an_unknown_model_type_lists_what_can_be_sized(config_file, capsys):
    path = config_file({"model_type": "llama", "hidden_size": 4096})
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'llama'" in err and all(t in err for t in SIZEABLE)


@pytest.mark.parametrize(
    ("name", "key"),
    [("DeepSeek-V3", "kv_lora_rank"), ("gpt-oss-20b", "num_local_experts"), ("Qwen3-30B-A3B", "hidden_size")],
)
def test_a_missing_key_is_named(name, key, config_file, capsys):
    config = dict(PUBLISHED[name][0])
    del config[key]
    assert main(["info", str(config_file(config))]) == 2
    assert repr(key) in capsys.readouterr().err


def test_a_missing_config_is_named(tmp_path, capsys):
    assert main(["info", str(tmp_path / "config.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
