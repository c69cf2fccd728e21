"""`edgemoe bench --peers`: the logic around the timings (limits, budgets, medians and spreads,
the table, JSON, the plot, run status from a real cgroup), and with llama-cpp-python installed
one tiny end-to-end comparison."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import venv

import pytest

from edgemoe.bench import llama_cpp as peers
from edgemoe.bench import llama_cpp_worker
from edgemoe.devices.limits import cgroup_v1_available
from edgemoe.planning.default_model import SHIPPED

pytestmark = pytest.mark.peers

SHIPPED_TOKENIZER = SHIPPED / "tokenizer.json"


def test_limits_and_budget():
    assert peers.parse_limits("unlimited,1.2,0.8x, 0.5,0.3") == [None, 1.2, 0.8, 0.5, 0.3]
    with pytest.raises(ValueError):
        peers.parse_limits("0")
    gguf = 500_000_000
    assert peers.limit_bytes(None, gguf) is None
    assert peers.limit_bytes(1.2, gguf) == 600_000_000
    assert peers.limit_bytes(0.3, gguf) == 150_000_000
    # the expert budget is what is left of the limit; none when even one layer's experts do not fit
    assert peers.edgemoe_budget(None, 100, 10) is None
    assert peers.edgemoe_budget(600, 100, 10) == 500
    assert peers.edgemoe_budget(105, 100, 10) == 0


def _run(status, tps=None, **kw):
    r = {"status": status}
    if status == "ok":
        r.update(
            decode_tokens_per_s=tps,
            ttft_seconds=0.1,
            load_seconds=0.2,
            first_token_seconds=0.3,
            prefill_tokens_per_s=tps * 2,
            cgroup_peak_bytes=300e6,
            read_bytes=200e6,
            peak_rss_bytes=250e6,
        )
    return dict(r, **kw)


def test_median_spread_and_kills():
    assert peers.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert peers.spread([None, None]) is None
    c = peers.summarize([_run("ok", 10.0), _run("oom"), _run("ok", 14.0), _run("timeout")])
    assert c["decode_tokens_per_s"] == {"median": 12.0, "min": 10.0, "max": 14.0, "n": 2}
    assert (c["runs"], c["completed"], c["killed"], c["timeouts"], c["failed"]) == (4, 2, 1, 1, 0)
    assert peers.status_text(c) == "killed (OOM) 1/4, timeout 1/4"
    dead = peers.summarize([_run("oom")] * 3)
    assert dead["decode_tokens_per_s"] is None and peers.status_text(dead) == "killed (OOM) 3/3"
    assert peers.fmt(None) == "-"
    assert peers.fmt({"median": 12.345, "min": 11.0, "max": 13.0, "n": 3}, digits=2) == "12.35 (11.00-13.00)"
    assert peers.fmt({"median": 5e8, "min": 5e8, "max": 5e8, "n": 3}, 1e6, 0) == "500"
    assert peers.run_status(0, 0, 1.0, 10) == "ok"
    assert peers.run_status(-9, 1, 1.0, 10) == "oom"
    assert peers.run_status(-9, 0, 10.0, 10) == "timeout"
    assert peers.run_status(1, 0, 1.0, 10) == "failed"


def _cell(engine, runs, factor=None, limit=None):
    """A bench cell of the Mixtral-shaped model on the local disk, summarized from its runs."""
    return dict(
        peers.summarize(runs),
        model="mixtral-shaped",
        storage="local disk",
        read_bps=None,
        limit_factor=factor,
        limit_bytes=limit,
        engine=engine,
        weights="Q4_0" if engine == "llama.cpp" else "4-bit g32",
        runs_detail=runs,
    )


def _cells():
    cells = []
    for factor, limit, e_runs, l_runs in [
        (None, None, [_run("ok", 40.0)] * 3, [_run("ok", 50.0)] * 3),
        (1.2, 600_000_000, [_run("ok", 30.0)] * 3, [_run("ok", 3.0)] * 3),
        (0.3, 150_000_000, [_run("ok", 12.5)] * 3, [_run("oom")] * 3),
    ]:
        cells += [_cell("edgemoe", e_runs, factor, limit), _cell("llama.cpp", l_runs, factor, limit)]
    return cells


def test_the_decode_ratio_round_by_round_pairs_each_rounds_runs():
    """Medians can pair a fast minute of one engine with a slow one of the other; each round's
    two runs are seconds apart. A round where either run failed has no pair."""
    e = [_run("ok", 100.0), _run("ok", 150.0), _run("ok", 120.0), _run("ok", 200.0)]
    p = [_run("ok", 100.0), _run("ok", 100.0), _run("ok", 150.0), _run("timeout")]
    assert peers.round_ratios({"runs_detail": e}, {"runs_detail": p}, "decode_tokens_per_s") == [1.0, 1.5, 0.8]
    cells = [_cell("edgemoe", e), _cell("llama.cpp", p)]
    # medians 135 / 100 = 1.35x; the rounds' own ratios 0.80, 1.00 and 1.50: median 1.00x
    assert peers.ratio_lines(cells)[0].startswith(
        "- mixtral-shaped, local disk, unlimited: edgemoe 1.35x llama.cpp's decode speed "
        "(round by round 1.00x, 0.80-1.50x)"
    )
    one = [dict(c, runs_detail=c["runs_detail"][:1]) for c in cells]  # one round: no spread to give
    assert "round by round" not in peers.ratio_lines(one)[0]


def test_no_limit_against_a_limit_round_by_round():
    """edgemoe's run with no limit against its run at a limit in the same round: a round where
    both were fast and one where both were slow say 'no slower' though the medians differ."""
    free = [_run("ok", 100.0), _run("ok", 150.0), _run("ok", 160.0)]
    capped = [_run("ok", 95.0), _run("ok", 155.0), _run("ok", 150.0)]
    cells = [_cell("edgemoe", free), _cell("edgemoe", capped, 1.2, 600_000_000), _cell("llama.cpp", free)]
    # medians 150 / 150 = 1.00x; rounds 1.05, 0.97, 1.07: median 1.05x
    assert peers.limit_lines(cells) == [
        "- mixtral-shaped, local disk: edgemoe with no limit decodes 1.00x its speed at 1.2x (600 MB) "
        "(round by round 1.05x, 0.97-1.07x)"
    ]
    assert peers.limit_lines(cells[1:]) == []  # no run without a limit: nothing to compare


def test_table_ratios_and_json():
    cells = _cells()
    md = peers.markdown(cells, ["blkio throttling does not work here"])
    lines = md.splitlines()
    assert lines[0].startswith("| model | storage | limit | engine |")
    assert lines[1].count("|---") == 13
    assert (
        "| mixtral-shaped | local disk | 1.2x (600 MB) | llama.cpp | Q4_0 | 3.00 | 0.20 | 0.100 | 0.300 | 6.0 |" in md
    )
    assert "| 0.3x (150 MB) | llama.cpp | Q4_0 | - | - | - | - | - | - | - | killed (OOM) 3/3 |" in md
    assert (
        "mixtral-shaped, local disk, unlimited: edgemoe 0.80x llama.cpp's decode speed (round by round 0.80x, "
        "0.80-0.80x), 0.80x its prefill speed (second prompt), load + TTFT 0.300 s against 0.300 s" in md
    )
    assert "1.2x (600 MB): edgemoe 10.00x llama.cpp's decode speed (round by round 10.00x" in md
    assert "0.3x (150 MB): edgemoe 12.50 tok/s, llama.cpp killed (OOM) 3/3" in md
    assert (
        "- mixtral-shaped, local disk: edgemoe with no limit decodes 1.33x its speed at 1.2x (600 MB) "
        "(round by round 1.33x, 1.33-1.33x)" in md
    )
    assert "edgemoe with no limit decodes 3.20x its speed at 0.3x (150 MB)" in md
    assert md.rstrip().endswith("- blkio throttling does not work here")
    back = json.loads(json.dumps({"cells": cells}))
    assert back["cells"][5]["killed"] == 3 and back["cells"][2]["decode_tokens_per_s"]["median"] == 30.0


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "peers.png"
    peers.plot(_cells(), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not SHIPPED_TOKENIZER.exists(), reason="no default model in this checkout")
def test_pre_tokenizer_alias(tmp_path):
    # the default model's pre-tokenizer (Digits then ByteLevel) is llama.cpp's smollm pair of regexes
    assert peers.pre_tokenizer_alias(SHIPPED_TOKENIZER) == "smollm"
    odd = json.loads(SHIPPED_TOKENIZER.read_text())
    odd["pre_tokenizer"]["pretokenizers"][0]["individual_digits"] = False
    (tmp_path / "tokenizer.json").write_text(json.dumps(odd))
    assert peers.pre_tokenizer_alias(tmp_path / "tokenizer.json") is None


def test_llama_cpp_context_holds_the_run():
    # llama.cpp's default context is 512 positions: a 512-token prompt had no room for a new token
    for n_prompt in (16, 512, 700):
        spec = dict(model="m.gguf", prompt=list(range(n_prompt)), new_tokens=32, threads=2, seed=0)
        params = llama_cpp_worker.llama_params(spec)
        assert params["n_ctx"] >= n_prompt + 32
        assert (params["n_threads"], params["n_threads_batch"], params["model_path"]) == (2, 2, "m.gguf")


def _probe_sdist(links, name="edgemoe-peers-probe", ver="1.0"):
    """A source package built, as llama-cpp-python's is, by scikit-build-core."""
    files = {
        "pyproject.toml": (
            '[build-system]\nrequires = ["scikit-build-core>=0.10"]\nbuild-backend = "scikit_build_core.build"\n'
            f'[project]\nname = "{name}"\nversion = "{ver}"\n'
        ),
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n",
    }
    root = f"{name.replace('-', '_')}-{ver}"
    with tarfile.open(links / f"{root}.tar.gz", "w:gz") as tar:
        for fname, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{root}/{fname}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return f"{root}.tar.gz"


@pytest.mark.slow
def test_source_package_download_from_a_fresh_environment(tmp_path):
    """The converter's source package comes through pip in an environment that has only pip,
    as after `pip install '.[bench]'` in a fresh venv: no scikit-build-core to read the
    package's metadata with, so pip must build that metadata in isolation."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    missing = subprocess.run([python, "-c", "import scikit_build_core"], capture_output=True, text=True)
    assert missing.returncode != 0 and "scikit_build_core" in missing.stderr
    links, dest = tmp_path / "links", tmp_path / "sdist"
    links.mkdir()
    saved = _probe_sdist(links)
    cmd = peers.sdist_download_command("edgemoe-peers-probe", "1.0", dest, python=python)
    assert "--no-build-isolation" not in cmd and ":all:" not in cmd  # wheels for the backend's own needs
    r = subprocess.run(cmd + ["--find-links", str(links)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (dest / saved).read_bytes() == (links / saved).read_bytes()


ok, reason = cgroup_v1_available("memory")


@pytest.mark.cgroup
@pytest.mark.skipif(not ok, reason=f"needs a cgroup v1 memory group of our own: {reason}")
def test_cgroup_oom_and_timeout_are_reported(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\0" * 4096)
    hog = [sys.executable, "-c", "b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); print('alive')"]
    r = peers.run_in_cgroup(hog, [f], 64 << 20, None, timeout=60)
    assert r["status"] == "oom" and "alive" not in r["stdout"]
    assert r["cgroup_peak_bytes"] <= 64 << 20
    r = peers.run_in_cgroup(hog, [f], None, None, timeout=60)
    assert r["status"] == "ok" and r["cgroup_peak_bytes"] >= 300 << 20
    r = peers.run_in_cgroup([sys.executable, "-c", "import time; time.sleep(30)"], [f], None, None, timeout=1)
    assert r["status"] == "timeout"


@pytest.mark.cgroup
@pytest.mark.skipif(not ok, reason=f"needs a cgroup v1 memory group of our own: {reason}")
def test_tiny_comparison_end_to_end(tmp_path, tiny_checkpoint, monkeypatch):
    """A tiny Mixtral through llama.cpp's converter, Q4_0, and both engines in cgroups."""
    pytest.importorskip("llama_cpp")
    hf = tiny_checkpoint("mixtral")
    cache = tmp_path / "peers"
    cache.mkdir()
    from edgemoe.runtime.paths import cache_root

    shared, extract = cache_root() / "peers", peers.converter_dir  # the source package's converter, once per machine
    monkeypatch.setattr(peers, "converter_dir", lambda _: extract(shared))
    pair = peers.prepare_pair(str(hf), 4, cache)
    assert pair["tokenizer_check"]["identical"], pair["tokenizer_check"]
    assert pair["gguf"].name.endswith("Q4_0.gguf") and pair["gguf_q4_bytes"] == pair["gguf"].stat().st_size
    prompt = peers.prompt_ids("mixtral-shaped", hf, 520, 0, 512)  # longer than llama.cpp's default context
    for engine, model, extra in (
        ("llama.cpp", pair["gguf"], {}),
        ("edgemoe", pair["ours"], {"budget": None, "options": {}}),
    ):
        spec = dict(engine=engine, model=str(model), prompt=prompt, new_tokens=6, threads=1, seed=0, **extra)
        r = peers.run_limited(spec, [model], None, None, timeout=120)
        assert r["status"] == "ok", r
        assert r["tokens"] == 6 and r["decode_tokens_per_s"] > 0 and r["cgroup_peak_bytes"] > 0
        assert r["first_token_seconds"] == pytest.approx(r["load_seconds"] + r["ttft_seconds"])
        assert r["prefill_tokens_per_s"] == pytest.approx(len(prompt) / r["prefill_seconds"])


def test_repeats_run_round_by_round():
    """Every cell once per round, so a machine that slows down during a sweep slows every
    cell's runs alike; a skipped cell never runs."""
    order: list[str] = []
    cells = [{"name": n, "runs_detail": []} for n in ("edgemoe none", "llama.cpp none", "edgemoe 0.3x")]
    cells[2]["skipped"] = "no room"
    peers.run_rounds(
        [(c, lambda c=c: order.append(c["name"]) or {"status": "ok", "n": len(order)}) for c in cells], repeat=3
    )
    assert order == ["edgemoe none", "llama.cpp none"] * 3
    assert [r["n"] for r in cells[0]["runs_detail"]] == [1, 3, 5] and cells[2]["runs_detail"] == []
