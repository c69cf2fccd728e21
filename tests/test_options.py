"""StreamOptions: one typed object for how a model streams its experts, its fields also taken
as keywords of load(); every bad value is refused by name before any file is opened."""

from __future__ import annotations

import dataclasses

import pytest

import edgemoe
from edgemoe.cli import main
from edgemoe.converters.convert import convert
from edgemoe.runtime.options import StreamOptions


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint, tmp_path_factory):
    dst = tmp_path_factory.mktemp("options") / "m"
    convert(tiny_checkpoint("mixtral"), dst, bits=4, progress=False)
    return dst


def test_keywords_replace_fields_of_the_options_given(model_dir):
    base = StreamOptions(policy="lfu", io_threads=1)
    m = edgemoe.load(model_dir, memory_budget="1MB", options=base, preload="none")
    assert m.options == dataclasses.replace(base, preload="none")
    assert (m.cache.policy, m.cache.io_threads, m.preloading) == ("lfu", 1, "")
    assert edgemoe.load(model_dir).options == StreamOptions()


def test_an_unknown_keyword_lists_the_fields(model_dir):
    with pytest.raises(TypeError, match=r"unknown streaming option prefech; StreamOptions has .*prefetch"):
        edgemoe.load(model_dir, prefech="table")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("policy", "edgemoe", "policy must be one of 'lru', 'lfu', 'structure'"),
        ("prefetch", "oracle", "unknown predictor 'oracle'"),
        ("prefetch", "table:moe_in", "unknown predictor 'table:moe_in'"),
        ("prefetch", "lookahead:later", "unknown predictor 'lookahead:later'"),
        ("prefetch_ratio", 0.0, "prefetch_ratio .* must be > 0"),
        ("prefetch_min_prob", 1.5, "prefetch_min_prob is a probability"),
        ("preload", False, "preload must be one of"),
        ("io_threads", -1, "io_threads must be a whole number"),
        ("io_threads", True, "io_threads must be a whole number"),
        ("verify", "sometimes", "verify must be one of"),
        ("fallback", True, "fallback is None or a gate weight"),
        ("fallback", 2.0, "fallback is None or a gate weight"),
        ("embeddings", "mmap", "embeddings must be one of 'auto', 'file', 'ram'"),
        ("device", "pdp-11", "no device profile 'pdp-11'; known: "),
        ("kv_cache", "bfloat16", "kv_cache must be one of 'float16', 'float32'"),
    ],
)
def test_bad_values_are_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        StreamOptions(**{field: value})


def test_lookahead_points_and_device_profiles_are_accepted():
    assert StreamOptions(prefetch="fitted:layer_out").prefetch == "fitted:layer_out"
    assert StreamOptions(device="jetson-tx2-emmc").device == "jetson-tx2-emmc"


def test_the_kv_cache_flag_picks_what_the_cache_keeps(model_dir, capsys):
    """float16 by default (half the bytes), float32 on request, in the API and on the command line."""
    half, full = edgemoe.load(model_dir), edgemoe.load(model_dir, kv_cache="float32")
    ids = [5, 6, 7, 8, 9, 10]
    half.logits(ids)
    full.logits(ids)
    assert (half.stats()["kv_cache"], full.stats()["kv_cache"]) == ("float16", "float32")
    assert 2 * half.stats()["kv_cache_bytes"] == full.stats()["kv_cache_bytes"] > 0
    assert half.memory_needed(512) < full.memory_needed(512)
    assert main(["run", str(model_dir), "-p", "hello", "-n", "2", "--kv-cache", "float32", "--stats-json"]) == 0
    assert '"kv_cache": "float32"' in capsys.readouterr().err


def test_cli_refuses_a_size_it_cannot_read_in_one_line(model_dir, capsys):
    assert main(["run", str(model_dir), "-p", "x", "--memory-budget", "lots"]) == 2
    err = capsys.readouterr().err
    assert "argument --memory-budget: cannot read 'lots' as a size" in err and "Traceback" not in err
