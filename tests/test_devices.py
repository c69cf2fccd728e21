"""Device and link profiles (every figure with its source), this machine's detection, the
settings suggestion, and `edgemoe devices` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgemoe.cli import devices as devices_cli
from edgemoe.cli import main
from edgemoe.cluster.settings import MemoryTerms, suggest
from edgemoe.devices import (
    PROFILE_DIR,
    PROFILE_FIELDS,
    estimate_int4_bytes_per_s,
    list_profiles,
    load_link,
    load_links,
    load_profile,
    load_profile_file,
)
from edgemoe.devices.detect import cpu_flags, measure_read
from edgemoe.errors import DeviceProfileError, EdgeMoEError
from edgemoe.format import quant

BOARDS = [
    "jetson-orin-nano-nvme",
    "jetson-orin-nx-nvme",
    "jetson-agx-orin-emmc",
    "jetson-tx2-emmc",
    "raspberry-pi-4-sd",
    "raspberry-pi-5-sd",
    "phone-ufs31",
    "phone-sd8gen3-ufs40",
    "rtx4090-server-nvme",
]


def test_the_boards_have_profiles():
    assert set(BOARDS) <= set(list_profiles())


@pytest.mark.parametrize("name", list_profiles())
def test_every_profile_has_every_field_with_a_source(name):
    p = load_profile(name)
    doc = json.loads((PROFILE_DIR / f"{name}.json").read_text())
    for field in PROFILE_FIELDS:
        assert doc["sources"][field].strip(), field
    numbers = [p.ram_bytes, p.cpu_cores, p.read_bytes_per_s, p.read_latency_s, p.memory_bytes_per_s]
    numbers += [p.cpu_hz, p.int4_bytes_per_s, p.idle_w, p.active_w, p.link.rtt_s, p.link.bits_per_s]
    assert all(x > 0 for x in numbers)
    assert p.idle_w < p.active_w
    # a compute figure that is an estimate is the documented rule applied to the profile's own figures
    if p.is_estimate("compute.int4_bytes_per_s"):
        assert p.int4_bytes_per_s == estimate_int4_bytes_per_s(p.memory_bytes_per_s, p.cpu_cores, p.cpu_hz)
        assert "estimate" in p.sources["compute.int4_bytes_per_s"]


def test_storage_figures_the_runtime_emulates_are_kept():
    # load(device=...) throttles reads with these; benchmarks in docs/ were measured with them
    assert (load_profile("raspberry-pi-4-sd").read_bytes_per_s, load_profile("raspberry-pi-4-sd").read_latency_s) == (
        45_000_000,
        0.001,
    )
    assert load_profile("jetson-tx2-emmc").read_bytes_per_s == 250_000_000
    assert load_profile("jetson-orin-nx-nvme").ram_bytes == 16 << 30


def test_links():
    links = load_links()
    assert {n: (ln.rtt_s, ln.bits_per_s) for n, ln in links.items()} == {
        "wired-gigabit": (0.0002, 1e9),
        "wifi5": (0.001, 3e8),
        "crowded-wifi": (0.004, 5e7),
    }
    with pytest.raises(DeviceProfileError, match="no link profile 'carrier-pigeon'; known: "):
        load_link("carrier-pigeon")


@pytest.mark.parametrize("field", ["memory_bytes_per_s", "power.idle_w", "compute.int4_bytes_per_s", "link"])
def test_a_missing_field_is_named_with_its_file(tmp_path, field):
    doc = json.loads((PROFILE_DIR / "raspberry-pi-5-sd.json").read_text())
    node = doc
    *parents, last = field.split(".")
    for key in parents:
        node = node[key]
    del node[last]
    path = tmp_path / "pi.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DeviceProfileError) as e:
        load_profile_file(path)
    assert str(path) in str(e.value) and f'no "{field}"' in str(e.value)
    assert isinstance(e.value, EdgeMoEError) and isinstance(e.value, ValueError)


def test_a_figure_without_a_source_is_named(tmp_path):
    doc = json.loads((PROFILE_DIR / "raspberry-pi-5-sd.json").read_text())
    del doc["sources"]["power.active_w"]
    path = tmp_path / "pi.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DeviceProfileError, match=r'pi\.json gives no source for "power\.active_w"'):
        load_profile_file(path)


def test_an_unknown_profile_lists_the_known_ones():
    with pytest.raises(ValueError, match="no device profile 'pdp-11'; known: .*raspberry-pi-5-sd"):
        load_profile("pdp-11")


def test_cpu_flags_of_x86_and_arm(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma f16c avx512f\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm aes asimddp\n")
    assert cpu_flags(x86) == ["avx2", "avx512f", "fma", "f16c"]
    assert cpu_flags(arm) == ["neon", "asimd", "asimddp"]
    assert cpu_flags(tmp_path / "missing") == []


def test_read_probe_removes_its_file(tmp_path):
    r = measure_read(directory=tmp_path, nbytes=2 << 20, latency_reads=4)
    assert r.temporary and r.bytes_read == 2 << 20 and r.read_bytes_per_s > 0 and r.read_latency_s > 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("hidden, inter", [(64, 128), (128, 384), (256, 704)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_expert_blob_size_by_arithmetic_matches_the_packer(hidden, inter, bits, symmetric):
    shapes = ((inter, hidden), (inter, hidden), (hidden, inter))
    if bits == 16:
        mats = [quant.float_matrix(np.zeros(s, np.float32), "bf16") for s in shapes]
    else:
        mats = [quant.quantize_matrix(np.zeros(s, np.float32), bits, 64, symmetric) for s in shapes]
    assert quant.expert_nbytes(hidden, inter, bits, 64, symmetric) == quant.pack_expert_blob(0, 0, *mats).nbytes


def test_suggestion_takes_the_highest_bitwidth_that_fits():
    terms = MemoryTerms(
        other_bytes=100, min_budget=40, expert_bytes={"as converted": 800, "8": 400, "4": 200}, context_tokens=256
    )
    s = suggest(terms, available_bytes=600, cores=4, reserve_bytes=0)
    assert (s.bits, s.streaming, s.memory_budget, s.threads) == (8, False, 400, 4)
    s = suggest(terms, available_bytes=350, cores=4, reserve_bytes=0)
    assert (s.bits, s.streaming, s.memory_budget) == (4, False, 200)
    s = suggest(terms, available_bytes=250, cores=2, reserve_bytes=0)  # 150 for experts: 4-bit, streamed
    assert (s.bits, s.streaming, s.memory_budget) == (4, True, 150) and "stream" in s.notes[0]
    s = suggest(terms, available_bytes=110, cores=2, reserve_bytes=0)  # 10 left, 4-bit needs 10 (40 x 200/800)
    assert s.memory_budget == 10
    s = suggest(terms, available_bytes=105, cores=2, reserve_bytes=0)
    assert s.memory_budget == 0 and "too little" in s.notes[0]


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint, tmp_path_factory):
    dst = tmp_path_factory.mktemp("devices") / "model"
    assert main(["convert", str(tiny_checkpoint("mixtral")), "-o", str(dst), "--bits", "8", "-q"]) == 0
    return dst


def test_devices_lists_every_profile(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    for name in list_profiles():
        assert name in out
    assert "wired-gigabit" in out and "crowded-wifi" in out and "~ an estimate" in out


def test_detect_with_a_model_reads_its_experts_file(model_dir, capsys):
    assert main(["devices", "--detect", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "this machine" in out and "experts.bin" in out
    assert "suggested: convert with --bits 8 (all in RAM)" in out and "--threads" in out


def test_detect_without_a_model_measures_a_temporary_file(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(devices_cli, "resolve_model", lambda path: str(model_dir))  # not the default model
    argv = ["devices", "--detect", "--probe-size", "4MiB", "--probe-dir", str(tmp_path), "--json"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["machine"]["read"]["temporary"] and doc["machine"]["read"]["bytes_read"] == 4 << 20
    assert doc["suggestion"]["bits"] == 8 and doc["machine"]["physical_cores"] >= 1
    assert list(Path(tmp_path).iterdir()) == []
