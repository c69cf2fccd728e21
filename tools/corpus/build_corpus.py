#!/usr/bin/env python3
"""Build the training corpus of edgemoe's default model from installed Debian packages.

The corpus mixes domains and languages on purpose (fortunes in six languages,
reference docs, man pages, a dictionary, Python and C code) so that the experts
of a small MoE have something to specialise in.

This script installs nothing. Install its inputs first (Debian 12):

    apt-get install -y --no-install-recommends \
        fortunes fortunes-min fortunes-bofh-excuses fortunes-de fortunes-es \
        fortunes-it fortunes-br fortunes-eo python3.11-doc dict-gcide jargon-text \
        debian-reference-en debian-reference-fr debian-reference-de \
        manpages manpages-dev manpages-fr manpages-de manpages-es \
        libc6-dev linux-libc-dev libpython3.11-stdlib libpython3.11-minimal

Then: python tools/corpus/build_corpus.py --out artifacts/corpus

Outputs: {train,validation,test}.txt (documents separated by a line holding
only the ASCII record separator \\x1e), sources.json (one record per part:
package, version, licence, documents and bytes per split).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html.parser
import json
import random
import re
import subprocess
import sys
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

DOC_SEP = "\n\x1e\n"  # never occurs in cleaned text (control chars are stripped)
SPLIT_FRACTIONS = {"validation": 0.01, "test": 0.01}  # the rest is train
MB = 1_000_000


# --- reading what packages installed -----------------------------------------------------


def package_files(pkg: str) -> list[str]:
    out = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"package {pkg} is not installed: apt-get install {pkg} (see this script's docstring)")
    return sorted(line for line in out.stdout.splitlines() if Path(line).is_file())


def package_version(pkg: str) -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True)
    return out.stdout.strip()


# Packages whose copyright file is free-form text, not the machine-readable
# (DEP-5) format: their licences as read by hand from /usr/share/doc/<pkg>/copyright.
UNSTRUCTURED_LICENCES = {
    "fortunes": "BSD-4-clause (fortune-mod); cookie files of various free origins",
    "fortunes-min": "BSD-4-clause (fortune-mod); cookie files of various free origins",
    "fortunes-bofh-excuses": "public-domain",
    "fortunes-it": "public-domain (freeware: copy, modify and redistribute freely)",
    "fortunes-eo": "public-domain (author died 1917); computerized version GPL",
    "fortunes-br": "GPL-2+",
    "python3.11-doc": "PSF-2.0",
    "libpython3.11-stdlib": "PSF-2.0",
    "libpython3.11-minimal": "PSF-2.0",
    "dict-gcide": "GPL-2+",
    "jargon-text": "public-domain",
    "libc6-dev": "LGPL-2.1+ (most of glibc; see the file for the rest)",
}


def package_licence(pkg: str) -> str:
    """Licence names: the License fields of a machine-readable copyright file, else the
    hand-read summary above; 'unknown' names the file to read."""
    path = Path(f"/usr/share/doc/{pkg}/copyright")
    if not path.exists():
        return f"unknown (no {path})"
    text = path.read_text(errors="replace")
    if text.startswith("Format:"):  # DEP-5: "License: <name>" opens each licence paragraph
        names = []
        for m in re.finditer(r"^License:[ \t]*(\S.*)$", text, re.M):
            name = m.group(1).strip()
            if name not in names:
                names.append(name)
        if names:
            return "; ".join(names)
    return UNSTRUCTURED_LICENCES.get(pkg, f"unknown (free-form {path}: read it)")


def read_text(path: str) -> str:
    raw = gzip.open(path).read() if path.endswith((".gz", ".dz")) else Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


# --- cleaning -----------------------------------------------------------------------------

_CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean(text: str) -> str:
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CTRL.sub("", text)
    lines = [ln.rstrip() for ln in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


def dedup_key(text: str) -> str:
    return hashlib.sha1(" ".join(text.lower().split()).encode()).hexdigest()


# --- per-format extractors (each yields documents) -----------------------------------------


def fortune_docs(path: str) -> Iterator[str]:
    yield from re.split(r"^%\s*$", read_text(path), flags=re.M)


class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page, skipping navigation; <pre> keeps its layout."""

    SKIP_TAGS = {"script", "style", "head", "title"}
    SKIP_CLASSES = {
        "navheader",
        "navfooter",
        "related",
        "sphinxsidebar",
        "footer",
        "headerlink",
        "mobile-nav",
        "toc",
        "breadcrumbs",
    }
    BLOCK = {
        "p",
        "div",
        "br",
        "li",
        "dt",
        "dd",
        "tr",
        "table",
        "ul",
        "ol",
        "dl",
        "section",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "pre",
        "blockquote",
        "hr",
    }
    VOID = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.stack: list[tuple[str, bool]] = []  # (tag, starts a skipped region)
        self.skip = 0
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.BLOCK:
            self.parts.append("\n")
        if tag in self.VOID:
            return
        classes = set((dict(attrs).get("class") or "").split())
        skipping = tag in self.SKIP_TAGS or bool(classes & self.SKIP_CLASSES)
        self.stack.append((tag, skipping))
        self.skip += skipping
        self.pre += tag == "pre"

    def handle_endtag(self, tag):
        # pop to the matching tag; tolerate unclosed tags
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                for t, s in self.stack[i:]:
                    self.skip -= s
                    self.pre -= t == "pre"
                del self.stack[i:]
                break
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.skip:
            return
        self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        lines = [ln.strip() if not ln.startswith("    ") else ln for ln in "".join(self.parts).split("\n")]
        return "\n".join(lines)


def html_doc(path: str) -> Iterator[str]:
    p = _HTMLText()
    p.feed(read_text(path))
    p.close()
    yield p.text()


_ROFF_ESC = {
    "\\-": "-",
    "\\(em": "—",
    "\\(en": "–",
    "\\(aq": "'",
    "\\(dq": '"',
    "\\(lq": "“",
    "\\(rq": "”",
    "\\(oq": "‘",
    "\\(cq": "’",
    "\\(bu": "•",
    "\\(co": "©",
    "\\(rg": "®",
    "\\(mu": "×",
    "\\(de": "°",
    "\\(ti": "~",
    "\\(ha": "^",
    "\\(ga": "`",
    "\\(rs": "\\",
    "\\(Fo": "«",
    "\\(Fc": "»",
    "\\(hy": "-",
    "\\(+-": "±",
    "\\(<=": "<=",
    "\\(>=": ">=",
    "\\(->": "->",
    "\\(pc": "·",
    "\\e": "\\",
    "\\ ": " ",
    "\\~": " ",
    "\\0": " ",
    "\\|": "",
    "\\^": "",
    "\\&": "",
    "\\%": "",
    "\\c": "",
    "\\:": "",
}
_ROFF_ESC_RE = re.compile("|".join(re.escape(k) for k in sorted(_ROFF_ESC, key=len, reverse=True)))
_ROFF_DROP_RE = re.compile(
    r"\\f(\[[^\]]*\]|\(..|.)|\\s[+-]?\d+|\\\*(\(..|\[[^\]]*\]|.)|\\\((..)|\\\[[^\]]*\]|\\[nk](\(..|.)|\\[hvwbo]'[^']*'"
)
_FONT_MACROS = {"B", "I", "BR", "BI", "IB", "IR", "RB", "RI", "SM", "SB", "UR", "MT"}


def _roff_args(s: str) -> list[str]:
    return [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', s)]


def roff_inline(s: str) -> str:
    s = _ROFF_ESC_RE.sub(lambda m: _ROFF_ESC[m.group(0)], s)
    return _ROFF_DROP_RE.sub("", s).replace("\\", "")


def manpage_doc(path: str) -> Iterator[str]:
    src = read_text(path)
    if src.lstrip().startswith(".so "):
        return  # a link to another page
    out: list[str] = []
    for line in src.split("\n"):
        if line.startswith('.\\"') or line.startswith("'\\\"") or line.startswith('.\\"'):
            continue
        if line.startswith(".") or line.startswith("'"):
            m = re.match(r"[.']\s*(\S+)\s*(.*)", line)
            if not m:
                continue
            macro, rest = m.group(1), m.group(2)
            if macro in ("SH", "SS"):
                out.append("\n" + roff_inline(" ".join(_roff_args(rest))) + "\n")
            elif macro in _FONT_MACROS:
                args = _roff_args(rest)
                joiner = " " if macro in ("B", "I", "SM", "SB") else ""
                out.append(roff_inline(joiner.join(args)))
            elif macro in ("PP", "P", "LP", "IP", "TP", "sp", "br"):
                out.append("\n" if macro != "IP" else "\n" + roff_inline(" ".join(_roff_args(rest)[:1])))
            elif macro in (
                "nf",
                "fi",
                "EX",
                "EE",
                "RS",
                "RE",
                "in",
                "TH",
                "ad",
                "na",
                "nh",
                "hy",
                "ft",
                "ne",
                "ps",
                "vs",
                "ta",
                "ti",
                "ll",
                "ds",
                "de",
                "if",
                "ie",
                "el",
                "so",
                "nr",
                "TS",
                "TE",
                "UE",
                "ME",
                "PD",
                "ss",
                "cs",
                "ig",
                "..",
                "mso",
                "ce",
            ):
                continue
            else:
                continue
        else:
            out.append(roff_inline(line))
    text = "\n".join(out)
    text = re.sub(r"[ \t]+\n", "\n", text)
    yield text


def dict_docs(path: str, entries_per_doc: int = 12) -> Iterator[str]:
    """dictd database: entries start at column 0 after a blank line; group neighbours into one document."""
    text = read_text(path)
    entries = re.split(r"\n\s*\n(?=\S)", text)
    entries = [e for e in entries if not e.startswith("00-database") and "Begin file" not in e[:200]]
    for i in range(0, len(entries), entries_per_doc):
        yield "\n\n".join(entries[i : i + entries_per_doc])


def paragraph_chunks(path: str, target: int = 3000) -> Iterator[str]:
    """Long plain text cut at blank lines into documents of about `target` characters."""
    buf: list[str] = []
    size = 0
    for para in re.split(r"\n\s*\n", read_text(path)):
        buf.append(para)
        size += len(para)
        if size >= target:
            yield "\n\n".join(buf)
            buf, size = [], 0
    if buf:
        yield "\n\n".join(buf)


def source_doc(path: str) -> Iterator[str]:
    yield read_text(path)


# --- the parts of the corpus ---------------------------------------------------------------


@dataclass
class Part:
    name: str
    domain: str
    language: str
    packages: list[str]
    select: Callable[[str], bool]
    extract: Callable[[str], Iterator[str]]
    cap_bytes: int | None = None  # sample documents down to about this many bytes
    min_chars: int = 20
    max_chars: int = 200_000
    notes: str = ""
    stats: dict = field(default_factory=dict)


def _is_fortune(path: str) -> bool:
    return path.startswith("/usr/share/games/fortunes") and "/off/" not in path and not path.endswith((".dat", ".u8"))


def _is_man(lang: str) -> Callable[[str], bool]:
    prefix = "/usr/share/man/" + (f"{lang}/" if lang else "man")
    return lambda p: p.startswith(prefix) and p.endswith(".gz")


PARTS = [
    Part(
        "fortunes-en",
        "fortunes",
        "en",
        ["fortunes", "fortunes-min", "fortunes-bofh-excuses"],
        _is_fortune,
        fortune_docs,
    ),
    Part("fortunes-de", "fortunes", "de", ["fortunes-de"], _is_fortune, fortune_docs),
    Part("fortunes-es", "fortunes", "es", ["fortunes-es"], _is_fortune, fortune_docs),
    Part("fortunes-it", "fortunes", "it", ["fortunes-it"], _is_fortune, fortune_docs),
    Part("fortunes-br", "fortunes", "pt", ["fortunes-br"], _is_fortune, fortune_docs),
    Part("fortunes-eo", "fortunes", "eo", ["fortunes-eo"], _is_fortune, fortune_docs),
    Part(
        "python-docs",
        "reference-docs",
        "en",
        ["python3.11-doc"],
        lambda p: (
            p.endswith(".html")
            and "/html/" in p
            and "/_static/" not in p
            and not p.endswith(("genindex.html", "search.html"))
            and "/genindex-" not in p
        ),
        html_doc,
        cap_bytes=14 * MB,
        min_chars=200,
    ),
    Part(
        "debian-reference-en",
        "reference-docs",
        "en",
        ["debian-reference-en"],
        lambda p: p.endswith(".html"),
        html_doc,
        min_chars=200,
    ),
    Part(
        "debian-reference-fr",
        "reference-docs",
        "fr",
        ["debian-reference-fr"],
        lambda p: p.endswith(".html"),
        html_doc,
        min_chars=200,
    ),
    Part(
        "debian-reference-de",
        "reference-docs",
        "de",
        ["debian-reference-de"],
        lambda p: p.endswith(".html"),
        html_doc,
        min_chars=200,
    ),
    Part(
        "manpages-en",
        "manpages",
        "en",
        ["manpages", "manpages-dev"],
        _is_man(""),
        manpage_doc,
        cap_bytes=9 * MB,
        min_chars=100,
    ),
    Part("manpages-fr", "manpages", "fr", ["manpages-fr"], _is_man("fr"), manpage_doc, min_chars=100),
    Part("manpages-de", "manpages", "de", ["manpages-de"], _is_man("de"), manpage_doc, min_chars=100),
    Part("manpages-es", "manpages", "es", ["manpages-es"], _is_man("es"), manpage_doc, min_chars=100),
    Part(
        "gcide", "dictionary", "en", ["dict-gcide"], lambda p: p.endswith("gcide.dict.dz"), dict_docs, cap_bytes=12 * MB
    ),
    Part("jargon", "dictionary", "en", ["jargon-text"], lambda p: p.endswith("jargon.txt.gz"), paragraph_chunks),
    Part(
        "python-stdlib",
        "code-python",
        "python",
        ["libpython3.11-stdlib", "libpython3.11-minimal"],
        lambda p: p.endswith(".py") and "/test/" not in p and "/idlelib/idle_test/" not in p,
        source_doc,
        cap_bytes=11 * MB,
        min_chars=100,
        max_chars=150_000,
    ),
    Part(
        "c-headers",
        "code-c",
        "c",
        ["libc6-dev", "linux-libc-dev"],
        lambda p: p.endswith(".h"),
        source_doc,
        cap_bytes=7 * MB,
        min_chars=100,
        max_chars=150_000,
    ),
]


def build(out: Path, seed: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "validation": [], "test": []}  # (document, part)
    records = []
    for part in PARTS:
        rng = random.Random(f"{seed}:{part.name}")
        files = [f for pkg in part.packages for f in package_files(pkg) if part.select(f)]
        docs = []
        n_dup = n_short = 0
        for f in files:
            for raw in part.extract(f):
                doc = clean(raw)
                if len(doc) < part.min_chars:
                    n_short += 1
                    continue
                doc = doc[: part.max_chars]
                key = dedup_key(doc)
                if key in seen:
                    n_dup += 1
                    continue
                seen.add(key)
                docs.append(doc)
        total = sum(len(d.encode()) for d in docs)
        rng.shuffle(docs)
        if part.cap_bytes and total > part.cap_bytes:
            kept, size = [], 0
            for d in docs:
                if size >= part.cap_bytes:
                    break
                kept.append(d)
                size += len(d.encode())
            docs = kept
        # split by document: the first shuffled documents go to validation and test
        n = len(docs)
        n_val = max(1, round(n * SPLIT_FRACTIONS["validation"]))
        n_test = max(1, round(n * SPLIT_FRACTIONS["test"]))
        assign = {"validation": docs[:n_val], "test": docs[n_val : n_val + n_test], "train": docs[n_val + n_test :]}
        rec = {
            "part": part.name,
            "domain": part.domain,
            "language": part.language,
            "packages": [
                {"name": p, "version": package_version(p), "licence": package_licence(p)} for p in part.packages
            ],
            "files_read": len(files),
            "documents_dropped_duplicate": n_dup,
            "documents_dropped_short": n_short,
            "bytes_available": total,
            "cap_bytes": part.cap_bytes,
            "splits": {s: {"documents": len(d), "bytes": sum(len(x.encode()) for x in d)} for s, d in assign.items()},
        }
        records.append(rec)
        for s, d in assign.items():
            splits[s].extend((x, part.name) for x in d)
        print(
            f"{part.name:22s} files={len(files):5d} docs={n:6d} bytes={sum(v['bytes'] for v in rec['splits'].values()) / MB:6.2f}MB"
            f" (available {total / MB:.2f}MB, dup {n_dup}, short {n_short})",
            flush=True,
        )

    for s, items in splits.items():
        random.Random(f"{seed}:order:{s}").shuffle(items)
        (out / f"{s}.txt").write_text(DOC_SEP.join(doc for doc, _ in items) + "\n", encoding="utf-8")
        # which part each document comes from, one line per document in the same order
        (out / f"{s}.parts.txt").write_text("".join(part + "\n" for _, part in items), encoding="utf-8")

    domains: dict[str, int] = {}
    for r in records:
        domains[r["domain"]] = domains.get(r["domain"], 0) + sum(v["bytes"] for v in r["splits"].values())
    grand = sum(domains.values())
    summary = {
        "seed": seed,
        "document_separator": repr(DOC_SEP),
        "split_fractions": SPLIT_FRACTIONS,
        "total_bytes": grand,
        "domains": {d: {"bytes": b, "share": round(b / grand, 4)} for d, b in sorted(domains.items())},
        "splits": {s: {"documents": len(d), "bytes": sum(len(x.encode()) for x, _ in d)} for s, d in splits.items()},
        "parts": records,
    }
    (out / "sources.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(
        f"total {grand / MB:.1f} MB; domains: "
        + ", ".join(f"{d} {v['share'] * 100:.1f}%" for d, v in summary["domains"].items())
    )
    worst = max(summary["domains"].items(), key=lambda kv: kv[1]["share"])
    if worst[1]["share"] > 0.40:
        print(f"warning: domain {worst[0]} is {worst[1]['share'] * 100:.1f}% of the corpus (>40%)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("artifacts/corpus"))
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    build(args.out, args.seed)


if __name__ == "__main__":
    main()
