"""`edgemoe bench --peers llama.cpp`: edgemoe against llama.cpp (llama-cpp-python) on the same
weights, under the same cgroup v1 memory limits, on the same (optionally throttled) disk.

The peer, honestly configured: the same Hugging Face checkpoint is converted to GGUF by
llama.cpp's own convert_hf_to_gguf.py (taken from the llama-cpp-python source package that
is installed), quantized by llama_cpp.llama_model_quantize (Q4_0 against our 4 bits, Q8_0
against 8) and run through llama_cpp.Llama with its defaults (mmap on). Both engines get the
same prompt ids, the same sampling, the same number of new tokens and the same threads, each
in its own process inside a fresh memory cgroup, after the model files left the page cache.

Limits are multiples of the 4-bit GGUF file's size. edgemoe's expert budget inside a limit is
the limit minus everything else Model.memory_needed counts (backbone, KV cache, scratch, cache
bookkeeping, RUNTIME_OVERHEAD_BYTES), so the process stays inside the cgroup.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import runpy
import statistics
import subprocess
import sys
import tarfile
from collections.abc import Callable, Sequence
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypedDict

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..converters.convert import convert
from ..devices import load_profile
from ..devices.limits import Cgroup, cgroup_v1_available, drop_page_cache
from ..planning.default_model import SHIPPED, _fingerprint
from ..runtime.engine import load
from ..runtime.paths import cache_root
from . import llama_cpp_worker
from .modes import combo_name, direct_read_bandwidth, held_out_prompt, mode_options
from .synth import synth_mixtral

ENGINES = ("edgemoe", "llama.cpp")
DEFAULT_LIMITS = "unlimited,1.2,0.8,0.5,0.3"
GGUF_TYPES = {4: "Q4_0", 8: "Q8_0"}


class _Setting(TypedDict):
    """Keywords of converters.convert.convert."""

    bits: int
    backbone_bits: int
    group_size: int
    symmetric: bool


# Our setting nearest each GGUF type. Q4_0: groups of 32, one f16 scale, w = d * (q - 8); ours
# with --symmetric is the same arithmetic and layout cost (kind 4, docs/format.md: 4.5 bits per weight).
OUR_SETTINGS: dict[int, _Setting] = {
    4: _Setting(bits=4, backbone_bits=4, group_size=32, symmetric=True),
    8: _Setting(bits=8, backbone_bits=8, group_size=32, symmetric=True),
}
RUN_TIMEOUT_S = 300.0
# HF pre-tokenizers llama.cpp implements under another model's name, for checkpoints whose
# tokenizer hash convert_hf_to_gguf.py cannot know (it lists published models only).
# Digits(individual) then ByteLevel's GPT-2 regex is llama-vocab.cpp's pair of regexes
# "\p{N}" + GPT-2 used for starcoder/refact/smollm; smollm also keeps spaces as they are
# (clean_spaces = false), as our tokenizers do (clean_up_tokenization_spaces false).
PRE_TOKENIZER_ALIASES = [
    (
        {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
            ],
        },
        "smollm",
    ),
    ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt-2"),  # GPT-2's regex alone
]


# -- figures --------------------------------------------------------------------------
def parse_limits(text: str) -> list[float | None]:
    """'unlimited,1.2,0.5' -> [None, 1.2, 0.5]: multiples of the 4-bit GGUF file size."""
    out: list[float | None] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part in ("unlimited", "none", "inf"):
            out.append(None)
            continue
        f = float(part.rstrip("x"))
        if f <= 0:
            raise ValueError(f"a memory limit is a positive multiple of the 4-bit GGUF size, got {part!r}")
        out.append(f)
    return out


def limit_bytes(factor: float | None, gguf_bytes: int) -> int | None:
    return None if factor is None else int(factor * gguf_bytes)


def edgemoe_budget(limit: int | None, others: int, min_budget: int) -> int | None:
    """The expert budget that keeps edgemoe inside `limit` (None: unbounded); 0 when even the
    minimum budget does not fit (the run is skipped, not started)."""
    if limit is None:
        return None
    budget = limit - others
    return budget if budget >= min_budget else 0


def spread(values: Sequence[float | None]) -> dict[str, float] | None:
    """Median, min and max of the completed runs' figure (None when none completed)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


FIGURES = (
    "decode_tokens_per_s",
    "ttft_seconds",
    "load_seconds",
    "first_token_seconds",
    "prefill_tokens_per_s",
    "cgroup_peak_bytes",
    "read_bytes",
    "peak_rss_bytes",
)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell's figures over its runs: median/min/max of completed runs and how many were killed."""
    done = [r for r in runs if r["status"] == "ok"]
    out: dict[str, Any] = {f: spread([r.get(f) for r in done]) for f in FIGURES}
    out["runs"] = len(runs)
    out["completed"] = len(done)
    out["killed"] = sum(r["status"] == "oom" for r in runs)
    out["timeouts"] = sum(r["status"] == "timeout" for r in runs)
    out["failed"] = sum(r["status"] == "failed" for r in runs)
    return out


def fmt(s: dict[str, float] | None, scale: float = 1.0, digits: int = 1) -> str:
    """'12.3 (11.9-12.8)': the median with the min-max spread; '-' when nothing completed."""
    if s is None:
        return "-"
    m, lo, hi = (s[k] / scale for k in ("median", "min", "max"))
    if s.get("n", 1) == 1 or f"{lo:.{digits}f}" == f"{hi:.{digits}f}":
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def status_text(c: dict[str, Any]) -> str:
    n = c["runs"]
    if c.get("skipped"):
        return c["skipped"]
    parts = []
    if c["killed"]:
        parts.append(f"killed (OOM) {c['killed']}/{n}")
    if c["timeouts"]:
        parts.append(f"timeout {c['timeouts']}/{n}")
    if c["failed"]:
        parts.append(f"failed {c['failed']}/{n}")
    return ", ".join(parts) or "no"


def limit_text(factor: float | None, limit: int | None) -> str:
    if factor is None:
        return "unlimited"
    assert limit is not None  # a limit factor always comes with its bytes
    return f"{factor:g}x ({limit / 1e6:.0f} MB)"


TABLE_HEADER = (
    "| model | storage | limit | engine | weights | decode tok/s | load s | TTFT s | load + TTFT s "
    "| prefill tok/s (2nd prompt) | peak MB (cgroup) | read MB | killed |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def table_row(c: dict[str, Any]) -> str:
    return (
        f"| {c['model']} | {c['storage']} | {limit_text(c['limit_factor'], c['limit_bytes'])} | {c['engine']} "
        f"| {c['weights']} | {fmt(c['decode_tokens_per_s'], digits=2)} | {fmt(c['load_seconds'], digits=2)} "
        f"| {fmt(c['ttft_seconds'], digits=3)} | {fmt(c.get('first_token_seconds'), digits=3)} "
        f"| {fmt(c.get('prefill_tokens_per_s'), digits=1)} "
        f"| {fmt(c['cgroup_peak_bytes'], 1e6, 0)} | {fmt(c['read_bytes'], 1e6, 0)} | {status_text(c)} |"
    )


def round_ratios(e: dict[str, Any], p: dict[str, Any], figure: str) -> list[float]:
    """edgemoe's figure over llama.cpp's in each round where both runs completed. A round's two
    runs are seconds apart (run_rounds), so a host that slows down for a minute weighs on both
    alike, where the ratio of the two medians may pair a fast minute with a slow one."""
    out = []
    for a, b in zip(e.get("runs_detail") or [], p.get("runs_detail") or []):
        if a.get("status") == "ok" and b.get("status") == "ok" and a.get(figure) and b.get(figure):
            out.append(a[figure] / b[figure])
    return out


def round_text(ratios: list[float]) -> str:
    """' (round by round MEDIANx, MIN-MAXx)' from two rounds on, else nothing."""
    if len(ratios) < 2:
        return ""
    r = sorted(ratios)
    return f" (round by round {statistics.median(r):.2f}x, {r[0]:.2f}-{r[-1]:.2f}x)"


def ratio_lines(cells: list[dict[str, Any]]) -> list[str]:
    """At each (model, storage, limit), medians: edgemoe's decode and second-prompt prefill
    speeds over llama.cpp's (and, from two rounds on, the decode ratio of each round's pair of
    runs), and each engine's load + TTFT; then edgemoe with no limit against each limit."""
    lines = []
    key = lambda c: (c["model"], c["storage"], c["limit_factor"])  # noqa: E731
    for k in dict.fromkeys(key(c) for c in cells):
        by = {c["engine"]: c for c in cells if key(c) == k}
        e, p = by.get("edgemoe"), by.get("llama.cpp")
        if not e or not p:
            continue
        es, ps = e["decode_tokens_per_s"], p["decode_tokens_per_s"]
        where = f"{k[0]}, {k[1]}, {limit_text(k[2], e['limit_bytes'])}"
        if es and ps:
            by_round = round_text(round_ratios(e, p, "decode_tokens_per_s"))
            parts = [f"edgemoe {es['median'] / ps['median']:.2f}x llama.cpp's decode speed{by_round}"]
            ef, pf = e.get("prefill_tokens_per_s"), p.get("prefill_tokens_per_s")
            if ef and pf:
                parts.append(f"{ef['median'] / pf['median']:.2f}x its prefill speed (second prompt)")
            et, pt = e.get("first_token_seconds"), p.get("first_token_seconds")
            if et and pt:
                parts.append(f"load + TTFT {et['median']:.3f} s against {pt['median']:.3f} s")
            lines.append(f"- {where}: " + ", ".join(parts))
        elif es:
            lines.append(f"- {where}: edgemoe {es['median']:.2f} tok/s, llama.cpp {status_text(p)}")
        elif ps:
            lines.append(f"- {where}: llama.cpp {ps['median']:.2f} tok/s, edgemoe {status_text(e)}")
    lines += limit_lines(cells)
    return lines


def limit_lines(cells: list[dict[str, Any]]) -> list[str]:
    """edgemoe with no limit against each limit it decoded under, per model and storage: the
    ratio of the medians and, from two rounds on, of each round's pair of runs (a round runs
    every cell once, so the two are seconds apart, not minutes)."""
    lines = []
    ours = [c for c in cells if c["engine"] == "edgemoe" and c.get("decode_tokens_per_s")]
    for model, storage in dict.fromkeys((c["model"], c["storage"]) for c in ours):
        here = [c for c in ours if (c["model"], c["storage"]) == (model, storage)]
        free = next((c for c in here if c["limit_factor"] is None), None)
        if free is None:
            continue
        for c in here:
            if c is free:
                continue
            by_round = round_text(round_ratios(free, c, "decode_tokens_per_s"))
            ratio = free["decode_tokens_per_s"]["median"] / c["decode_tokens_per_s"]["median"]
            lines.append(
                f"- {model}, {storage}: edgemoe with no limit decodes {ratio:.2f}x its speed at "
                f"{limit_text(c['limit_factor'], c['limit_bytes'])}{by_round}"
            )
    return lines


def markdown(cells: list[dict[str, Any]], notes: list[str]) -> str:
    out = [TABLE_HEADER] + [table_row(c) for c in cells]
    ratios = ratio_lines(cells)
    if ratios:
        out += ["", *ratios]
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def plot(cells: list[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """tokens/s against the memory limit, one line per engine, one panel per model and storage;
    killed runs are drawn as crosses at 0, 'unlimited' at the right edge."""
    import matplotlib  # deferred: optional (the bench extra), and slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((c["model"], c["storage"]) for c in cells))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (model, storage) in zip(axes[0], panels):
        cs = [c for c in cells if c["model"] == model and c["storage"] == storage]
        finite = [c["limit_bytes"] for c in cs if c["limit_bytes"]]
        right = 1.25 * max(finite) if finite else 1.0
        for engine in dict.fromkeys(c["engine"] for c in cs):
            pts = sorted(((c["limit_bytes"] or right) / 1e6, c) for c in cs if c["engine"] == engine)
            xs = [x for x, c in pts if c["decode_tokens_per_s"]]
            ys = [c["decode_tokens_per_s"]["median"] for _, c in pts if c["decode_tokens_per_s"]]
            err = [
                [
                    c["decode_tokens_per_s"]["median"] - c["decode_tokens_per_s"]["min"]
                    for _, c in pts
                    if c["decode_tokens_per_s"]
                ],
                [
                    c["decode_tokens_per_s"]["max"] - c["decode_tokens_per_s"]["median"]
                    for _, c in pts
                    if c["decode_tokens_per_s"]
                ],
            ]
            line = ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=engine)
            dead = [x for x, c in pts if not c["decode_tokens_per_s"]]
            if dead:
                ax.plot(
                    dead,
                    [0] * len(dead),
                    "x",
                    color=line[0].get_color(),
                    markersize=9,
                    label=f"{engine}: killed / did not run",
                )
        ticks = sorted({(c["limit_bytes"] or right) / 1e6 for c in cs})
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:.0f}" if t != right / 1e6 else "none" for t in ticks])
        ax.set_xlabel("memory limit (MB)")
        ax.set_ylabel("decode tokens/s")
        ax.set_yscale("symlog", linthresh=1)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{model}, {storage}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- llama.cpp's converter, from the installed llama-cpp-python's source package -----
# the llama.cpp source package used for its converter when llama-cpp-python is not installed
CONVERTER_SOURCE_VERSION = "0.3.36"


def sdist_download_command(package: str, ver: str, dest: Path, python: str | None = None) -> list[str]:
    """pip's command that saves `package`==`ver`'s source package into dest, through the index
    pip is configured with. pip reads a source package's metadata by running its build backend,
    so the backend must come from an isolated build environment (a fresh install of the bench
    extra has no scikit-build-core), and only `package` is held to its source: the backend's
    own requirements come as wheels instead of being built from source."""
    return [
        python or sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        package,
        f"{package}=={ver}",
        "-d",
        str(dest),
    ]


def converter_dir(cache: Path, ver: str | None = None) -> Path:
    """llama.cpp's convert_hf_to_gguf.py with its conversion/ package and gguf-py, extracted from
    the source package of llama-cpp-python `ver` (default: the version installed, the same
    llama.cpp commit; CONVERTER_SOURCE_VERSION when none is). Only pip and the network are needed."""
    if ver is None:
        try:
            ver = version("llama-cpp-python")
        except PackageNotFoundError:
            ver = CONVERTER_SOURCE_VERSION
    dst = cache / f"llama.cpp-{ver}"
    if (dst / "convert_hf_to_gguf.py").exists():
        return dst
    sdists = cache / "sdist"
    sdist = sdists / f"llama_cpp_python-{ver}.tar.gz"
    if not sdist.exists():
        r = subprocess.run(sdist_download_command("llama-cpp-python", ver, sdists), capture_output=True, text=True)
        if r.returncode != 0 or not sdist.exists():
            raise RuntimeError(f"could not download the llama-cpp-python {ver} source package:\n{r.stderr[-2000:]}")
    root = f"llama_cpp_python-{ver}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
    tmp = dst.with_name(dst.name + ".part")
    with tarfile.open(sdist) as tar:
        members = [
            m
            for m in tar.getmembers()
            if m.name.startswith(root) and m.name[len(root) :].startswith(wanted) and (m.isfile() or m.isdir())
        ]
        for m in members:
            m.name = m.name[len(root) :]
        tar.extractall(tmp, members=members, filter="data")
    tmp.rename(dst)
    return dst


def pre_tokenizer_alias(tokenizer_json: Path) -> str | None:
    """The llama.cpp pre-tokenizer name whose regexes match this tokenizer.json's, if known."""
    pre = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("pre_tokenizer")

    def matches(spec: Any, have: Any) -> bool:
        if isinstance(spec, dict):
            return isinstance(have, dict) and all(matches(v, have.get(k)) for k, v in spec.items())
        if isinstance(spec, list):
            return isinstance(have, list) and len(spec) == len(have) and all(map(matches, spec, have))
        return spec == have

    return next((name for spec, name in PRE_TOKENIZER_ALIASES if matches(spec, pre)), None)


def _convert_hf_main(llama_dir: str, hf: str, *outs: str) -> None:
    """Run convert_hf_to_gguf.py in this process, once per (out, outtype) pair of `outs`; a BPE
    pre-tokenizer it cannot identify by hash but whose structure llama.cpp implements
    (PRE_TOKENIZER_ALIASES) gets that name."""
    sys.path[:0] = [llama_dir, str(Path(llama_dir) / "gguf-py")]
    from conversion.base import TextModel, logger  # llama.cpp's, from the source package

    by_hash = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return by_hash(self, tokenizer)
        except NotImplementedError:
            name = pre_tokenizer_alias(Path(self.dir_model) / "tokenizer.json")
            if name is None:
                raise
            logger.warning(f"edgemoe: pre-tokenizer identified by its structure as llama.cpp's {name!r}")
            return name

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    for out, outtype in zip(outs[0::2], outs[1::2]):
        sys.argv = ["convert_hf_to_gguf.py", hf, "--outfile", out, "--outtype", outtype]
        runpy.run_path(str(Path(llama_dir) / "convert_hf_to_gguf.py"), run_name="__main__")


def hf_to_gguf(hf: Path, out: Path, cache: Path, outtype: str = "auto") -> Path:
    """The checkpoint as a GGUF converted by llama.cpp's own script: `outtype` auto (the checkpoint's
    16-bit type), f32, f16, bf16 or q8_0."""
    return hf_to_ggufs(hf, {outtype: out}, cache)[outtype]


def hf_to_ggufs(hf: Path, outs: dict[str, Path], cache: Path) -> dict[str, Path]:
    """The checkpoint as one GGUF per {outtype: path}, all converted in one process (the converter
    imports torch and transformers once)."""
    todo = {t: p for t, p in outs.items() if not p.exists()}
    if todo:
        llama_dir = converter_dir(cache)
        tmps = {t: p.with_name(p.name + ".part") for t, p in todo.items()}
        print(
            f"converting {hf} to GGUF ({', '.join(todo)}) with llama.cpp's convert_hf_to_gguf.py ...", file=sys.stderr
        )
        args = [a for t, tmp in tmps.items() for a in (str(tmp), t)]
        r = subprocess.run(
            [sys.executable, "-m", "edgemoe.bench.llama_cpp", "--convert-hf", str(llama_dir), str(hf), *args],
            capture_output=True,
            text=True,
            cwd="/",
        )
        if r.returncode != 0 or not all(tmp.exists() for tmp in tmps.values()):
            raise RuntimeError(f"llama.cpp's convert_hf_to_gguf.py failed on {hf}:\n{r.stderr[-3000:]}")
        for t, tmp in tmps.items():
            tmp.rename(todo[t])
    return outs


QUANTIZE_FTYPES = ("Q4_0", "Q8_0", "Q4_K_M", "Q6_K", "Q2_K", "IQ4_NL")


def quantize_gguf(src: Path, out: Path, kind: str, threads: int = 2) -> Path:
    """llama_cpp.llama_model_quantize to one of QUANTIZE_FTYPES (llama.cpp's own choices per tensor)."""
    if out.exists():
        return out
    import llama_cpp  # deferred: optional (the bench extra)

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.nthread = threads
    tmp = out.with_name(out.name + ".part")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {kind}) failed with {rc}")
    tmp.rename(out)
    return out


def tokenizer_check(gguf: Path, hf: Path, text: str) -> dict[str, Any]:
    """Does llama.cpp tokenize like the checkpoint's tokenizer.json? (the pre-tokenizer alias's proof)"""
    import llama_cpp  # deferred: optional (the bench extra)

    ours = Tokenizer.from_file(str(hf / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return {
        "tokens": len(ours),
        "llama_cpp_tokens": len(theirs),
        "identical": ours == theirs,
        "first_difference": None if ours == theirs else first,
    }


# -- the checkpoints ------------------------------------------------------------------
def mixtral_shaped_tokenizer(dst: Path, vocab_size: int) -> None:
    """A byte-level BPE for the random-weight model (which has none; GGUF needs one), trained on
    the shipped calibration text with the default model's pre-tokenizer. Its text is never used:
    both engines are given token ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(SHIPPED / "calib.txt")], trainer)
    tok.save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
    )


def peer_checkpoint(name: str, cache: Path, bench_cache: Path | None = None) -> Path:
    """The Hugging Face folder both engines convert from (mixtral-shaped: bench.synth's random
    checkpoint in bench_cache, with a tokenizer added beside it in `cache`)."""
    if name == "default":
        if not (SHIPPED / "config.json").exists():
            raise RuntimeError(f"this installation carries no default model ({SHIPPED})")
        return SHIPPED
    if name == "mixtral-shaped":
        src = (bench_cache or cache.parent / "bench") / "mixtral-shaped-hf"
        if not (src / "model.safetensors").exists():
            synth_mixtral(src)
        hf = cache / "mixtral-shaped-hf"
        if not (hf / "tokenizer.json").exists():
            hf.mkdir(parents=True, exist_ok=True)
            for f in ("config.json", "model.safetensors"):
                if not (hf / f).exists():
                    (hf / f).symlink_to(src / f)
            mixtral_shaped_tokenizer(hf, json.loads((src / "config.json").read_text())["vocab_size"])
        return hf
    return Path(name)


def _format_version(model_dir: Path) -> int:
    return int(json.loads((model_dir / "manifest.json").read_text(encoding="utf-8")).get("format_version", 0))


def prepare_pair(name: str, bits: int, cache: Path, bench_cache: Path | None = None) -> dict[str, Any]:
    """Both engines' files for one model at one setting: our model directory and the GGUF."""
    hf = peer_checkpoint(name, cache, bench_cache)
    # the checkpoint's fingerprint in every file name: a changed checkpoint is converted again
    tag = f"{name if name in ('default', 'mixtral-shaped') else hf.name}-{_fingerprint(hf)}"
    gguf16 = hf_to_gguf(hf, cache / f"{tag}-16bit.gguf", cache)
    q4 = quantize_gguf(gguf16, cache / f"{tag}-Q4_0.gguf", "Q4_0")
    gguf = quantize_gguf(gguf16, cache / f"{tag}-{GGUF_TYPES[bits]}.gguf", GGUF_TYPES[bits])
    s = OUR_SETTINGS[bits]
    ours = cache / f"{tag}-edgemoe-{bits}bit-g{s['group_size']}{'-sym' if s['symmetric'] else ''}"
    # format 1 stored symmetric codes with mins (5.0 bits at 4): redo; later versions differ only where this model has nothing
    if not (ours / "manifest.json").exists() or _format_version(ours) < 2:
        convert(hf, ours, overwrite=True, progress=False, **s)
    check_file = gguf.with_suffix(".tokenizer-check.json")
    if not check_file.exists():
        text = (SHIPPED / "test.txt").read_text(encoding="utf-8")[:20000]
        check_file.write_text(json.dumps(tokenizer_check(gguf, hf, text)))
    return {
        "hf": hf,
        "gguf": gguf,
        "gguf_q4_bytes": q4.stat().st_size,
        "ours": ours,
        "tokenizer_check": json.loads(check_file.read_text()),
        "setting": s,
        "gguf_type": GGUF_TYPES[bits],
    }


def prompt_ids(name: str, hf: Path, tokens: int, seed: int, vocab_size: int) -> list[int]:
    """The same prompt ids for both engines, as bench.held_out_prompt gives them: held-out text
    for a model with a trained tokenizer, random ids for the random-weight one (its routing does
    not follow text)."""
    encode = None
    if name != "mixtral-shaped" and (hf / "tokenizer.json").exists():
        tok = Tokenizer.from_file(str(hf / "tokenizer.json"))
        encode = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    return held_out_prompt(encode, vocab_size, tokens, seed)


def run_in_cgroup(
    cmd: Sequence[str], files: Sequence[Path], limit: int | None, read_bps: int | None, timeout: float = RUN_TIMEOUT_S
) -> dict[str, Any]:
    """cmd in a fresh cgroup (memory limit, optional blkio read throttle) after `files` left the
    page cache: its status (ok, oom, timeout, failed), the group's peak memory and its output."""
    drop_page_cache(*files)
    with Cgroup(memory_limit=limit, read_bps=read_bps, device_path=files[0]) as cg:
        lr = cg.run(cmd, timeout=timeout, cwd="/")
        oom_kills = cg.oom_kills()
    return {
        "status": run_status(lr.returncode, oom_kills, lr.wall_seconds, timeout),
        "cgroup_peak_bytes": lr.peak_memory_bytes,
        "wall_seconds": lr.wall_seconds,
        "returncode": lr.returncode,
        "read_bytes_children": lr.read_bytes,
        "stdout": lr.stdout,
        "stderr": lr.stderr[-2000:],
    }


def run_status(returncode: int, oom_kills: int, wall_seconds: float, timeout: float) -> str:
    """ok; oom when the group's OOM killer fired; timeout when we stopped it; else failed."""
    if returncode == 0:
        return "ok"
    if oom_kills > 0:
        return "oom"
    return "timeout" if wall_seconds >= timeout else "failed"


def run_limited(
    spec: dict[str, Any], files: Sequence[Path], limit: int | None, read_bps: int | None, timeout: float = RUN_TIMEOUT_S
) -> dict[str, Any]:
    """One measured run of run_worker(spec) in its own process and cgroup."""
    # the worker as a script (-P: not its folder on sys.path): a llama.cpp run must not carry edgemoe's imports
    cmd = [sys.executable, "-P", str(Path(llama_cpp_worker.__file__).resolve()), "--worker", json.dumps(spec)]
    r = run_in_cgroup(cmd, files, limit, read_bps, timeout)
    out = r.pop("stdout")
    if r["status"] == "ok":
        r.update(json.loads(out.strip().splitlines()[-1]))
    if r["status"] != "failed":
        r.pop("stderr")
    return r


# -- the comparison -------------------------------------------------------------------
def blkio_check(path: Path) -> tuple[bool, str]:
    """Whether a blkio read throttle really slows reads of `path` here: 8 MiB read with O_DIRECT
    under a 16 MB/s throttle must take about half a second."""
    ok, why = cgroup_v1_available("blkio")
    if not ok:
        return False, why
    size = path.stat().st_size
    start = max(0, size // 2 // 4096 * 4096 - (8 << 20))
    code = (
        f"import os,mmap,time;fd=os.open({str(path)!r},os.O_RDONLY|os.O_DIRECT);b=mmap.mmap(-1,1<<20)\n"
        f"t=time.perf_counter()\nfor i in range(8): os.preadv(fd,[b],({start}+i*(1<<20)))\n"
        "print(time.perf_counter()-t)"
    )
    try:
        with Cgroup(read_bps=16_000_000, device_path=path) as cg:
            lr = cg.run([sys.executable, "-c", code], timeout=30)
    except OSError as e:
        return False, f"cannot set blkio.throttle.read_bps_device: {e.strerror}"
    if lr.returncode != 0:
        return False, f"the throttled probe read failed: {lr.stderr.strip()[-300:]}"
    took = float(lr.stdout.strip())
    if took < 0.3:
        return False, f"8 MiB under a 16 MB/s blkio throttle took {took:.2f} s: the throttle does not apply"
    return True, f"8 MiB under a 16 MB/s throttle took {took:.2f} s"


def run_rounds(cells: Sequence[tuple[dict[str, Any], Callable[[], dict[str, Any]]]], repeat: int) -> None:
    """Each cell's `repeat` runs, appended to its "runs_detail", round by round: every cell
    once per round (skipped cells never), so that a machine drifting over the minutes of a
    sweep (other work, a slower host) weighs on every cell alike, not on whichever cell's
    repeats fell in the slow minutes."""
    for _ in range(repeat):
        for cell, run_once in cells:
            if not cell.get("skipped"):
                cell["runs_detail"].append(run_once())


def run(args: argparse.Namespace) -> int:
    """`edgemoe bench --peers ...`: the sweep, its table, JSON and plot."""
    peers = [p for p in args.peers.split(",") if p]
    unknown = [p for p in peers if p not in ENGINES[1:]]
    if unknown:
        raise SystemExit(f"edgemoe bench: unknown peer {unknown[0]!r}: choose from {', '.join(ENGINES[1:])}")
    bench_cache = Path(args.cache) if args.cache else cache_root() / "bench"  # as bench.prepare
    cache = bench_cache / "peers" if args.cache else cache_root() / "peers"
    cache.mkdir(parents=True, exist_ok=True)
    factors = parse_limits(args.limits)
    storages: list[tuple[str, int | None]] = []
    for d in (args.device or "none").split(","):
        storages.append(
            ("local disk", None)
            if d in ("", "none")
            else (f"{d} ({load_profile(d).read_bytes_per_s / 1e6:.0f} MB/s)", int(load_profile(d).read_bytes_per_s))
        )
    cells: list[dict[str, Any]] = []
    notes: list[str] = []
    lines: list[str] = []

    def emit(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    engines = ["edgemoe"] + peers
    for name in [n for n in args.models.split(",") if n]:
        bits = args.bits or 4
        pair = prepare_pair(name, bits, cache, bench_cache)
        q4 = pair["gguf_q4_bytes"]
        probe = load(pair["ours"], memory_budget=1 << 40)
        ctx = args.prompt_tokens + args.tokens
        others = probe.memory_needed(ctx) - probe.budget
        min_budget, vocab = probe.min_budget, probe.config.vocab_size
        info = probe.info()
        del probe
        options = mode_options(args.peer_mode, pair["ours"])
        prompt = prompt_ids(name, pair["hf"], args.prompt_tokens, args.seed, vocab)
        tc = pair["tokenizer_check"]
        s = pair["setting"]
        emit(
            f"\n## {name}: GGUF {pair['gguf_type']} {pair['gguf'].stat().st_size / 1e6:.1f} MB "
            f"(limits are multiples of the Q4_0 file, {q4 / 1e6:.1f} MB); edgemoe {bits}-bit "
            f"(group {s['group_size']}, {'symmetric' if s['symmetric'] else 'asymmetric'}, backbone "
            f"{s['backbone_bits']}-bit) {(info['expert_bytes'] + info['backbone_bytes'] + info['file_embedding_bytes']) / 1e6:.1f} MB, "
            f"{combo_name(options)}, {args.threads} threads, prompt {len(prompt)} ids, {args.tokens} new tokens, "
            f"median of {args.repeat} runs (min-max)"
        )
        bw = direct_read_bandwidth(pair["ours"], max_bytes=128 << 20)
        emit(
            f"local disk: {bw['expert_reads_bytes_per_s'] / 1e6:.0f} MB/s O_DIRECT reads of expert blobs "
            f"({bw['threads']} readers), {bw['sequential_bytes_per_s'] / 1e6:.0f} MB/s sequential"
        )
        emit(
            f"llama.cpp tokenizes {tc['tokens']} tokens of test.txt "
            + (
                "identically to tokenizer.json"
                if tc["identical"]
                else f"differently from tokenizer.json (first difference at token {tc['first_difference']})"
            )
        )
        for storage, bps in storages:
            if bps is not None:
                ok, why = blkio_check(pair["gguf"])
                if not ok:
                    note = f"blkio throttling does not work here ({why}): {storage} not run"
                    emit(f"\n{note}")
                    notes.append(note)
                    continue
                emit(f"\nblkio throttle verified ({why}); both engines read at {storage}")
            emit("\n" + TABLE_HEADER)
            sweep: list[tuple[dict[str, Any], Callable[[], dict[str, Any]]]] = []
            for factor in factors:
                limit = limit_bytes(factor, q4)
                for engine in engines:
                    cell: dict[str, Any] = {
                        "model": name,
                        "storage": storage,
                        "read_bps": bps,
                        "limit_factor": factor,
                        "limit_bytes": limit,
                        "engine": engine,
                    }
                    if engine == "llama.cpp":
                        files = [pair["gguf"]]
                        spec = {"engine": engine, "model": str(pair["gguf"])}
                        cell["weights"] = pair["gguf_type"]
                    else:
                        files = [pair["ours"]]
                        budget = edgemoe_budget(limit, others, min_budget)
                        spec = {"engine": engine, "model": str(pair["ours"]), "budget": budget, "options": options}
                        cell["weights"] = f"{bits}-bit g{s['group_size']}, {combo_name(options)}" + (
                            f", budget {budget / 1e6:.0f} MB" if budget else ", all experts" if budget is None else ""
                        )
                        cell["expert_budget_bytes"] = budget
                        cell["options"] = options
                    spec.update(prompt=prompt, new_tokens=args.tokens, threads=args.threads, seed=args.seed)
                    cell["runs_detail"] = []
                    if engine == "edgemoe" and spec["budget"] == 0:
                        cell["skipped"] = f"no room: {others / 1e6:.0f} MB besides experts"
                    sweep.append((cell, partial(run_limited, spec, files, limit, bps, timeout=args.run_timeout)))
            run_rounds(sweep, args.repeat)
            for cell, _ in sweep:
                cell.update(summarize(cell["runs_detail"]))
                cell["local_disk_read_bandwidth"] = bw
                cells.append(cell)
                emit(table_row(cell))
    if len(cells):
        emit("")
        for line in ratio_lines(cells):
            emit(line)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"cells": cells, "notes": notes}, indent=2, default=str))
    if args.markdown:
        Path(args.markdown).write_text(markdown(cells, notes))
    if args.plot:
        plot(cells, args.plot)
    return 0


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of `edgemoe bench --peers` (the bench verb adds --peers itself)."""
    g = ap.add_argument_group(
        "--peers",
        "edgemoe against other engines on the same weights (edgemoe/bench/llama_cpp.py); "
        "--device there is a comma list of profiles (or none) run through a real blkio throttle",
    )
    g.add_argument(
        "--limits",
        default=DEFAULT_LIMITS,
        help=f"memory limits, multiples of the 4-bit GGUF file size (default {DEFAULT_LIMITS})",
    )
    g.add_argument("--peer-threads", dest="threads", type=int, default=2, help="threads of both engines (default 2)")
    g.add_argument(
        "--peer-mode",
        default="edgemoe",
        help="edgemoe's mode in the comparison: edgemoe (bench.modes.BEST, default) or POLICY+PREDICTOR",
    )
    g.add_argument("--plot", default=None, help="write tokens/s against the memory limit to this PNG")
    g.add_argument("--run-timeout", type=float, default=RUN_TIMEOUT_S, help="seconds before a run is stopped")


if __name__ == "__main__":  # llama.cpp's converter in a process of its own (hf_to_gguf)
    if sys.argv[1:2] != ["--convert-hf"]:
        sys.exit("usage: edgemoe bench --peers llama.cpp (see edgemoe bench -h)")
    _convert_hf_main(*sys.argv[2:])
