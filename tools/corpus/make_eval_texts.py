#!/usr/bin/env python3
"""Cut the default model's calibration and test texts from the corpus splits.

    python tools/corpus/make_eval_texts.py --corpus artifacts/corpus --out edgemoe/default_model

calib.txt comes from the validation split and test.txt from the test split
(never from train), about --bytes each, documents separated by a line holding
only \\x1e like the corpus. Only parts whose licence clearly allows
redistribution are used (ALLOWED below); TEXTS.md next to them records which
packages, versions and licences every file draws on.

build_corpus.py does not store each document's part, but it can be recovered
exactly: a split is the parts' documents concatenated in PARTS order, then
shuffled with random.Random(f"{seed}:order:{split}"). The shuffle depends only
on the seed and the number of documents, so shuffling the indices the same way
says where every document came from; the per-part document and byte counts in
sources.json are checked against the result.

Every document is cut to at most --doc-bytes (at a line end) so that no single
man page or HTML page dominates a file, and each part gets a share of the bytes
proportional to its share of the training split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

DOC_SEP = "\n\x1e\n"

# part -> why it may be redistributed (checked against /usr/share/doc/<package>/copyright).
ALLOWED = {
    "fortunes-de": "GPL-2+",
    "fortunes-es": "GPL-2+",
    "fortunes-br": "GPL-2+",
    "fortunes-eo": "GPL (Esperanto translation of the GPL, per the package's copyright file)",
    "python-docs": "PSF-2.0 (Python documentation licence)",
    "debian-reference-en": "GPL-2+",
    "debian-reference-fr": "GPL-2+",
    "debian-reference-de": "GPL-2+",
    "manpages-en": "free: GPL-2+, BSD-2/3/4-clause, Expat, Linux-man-pages-copyleft (per page)",
    "manpages-fr": "GPL-3+",
    "manpages-de": "GPL-3+",
    "manpages-es": "GPL-3+",
    "gcide": "GPL-2+ (GCIDE)",
    "jargon": "public domain (the Jargon File)",
    "python-stdlib": "PSF-2.0",
    "c-headers": "LGPL-2.1+ (glibc) / GPL-2 with the Linux syscall note (kernel UAPI headers)",
}
# Left out: fortunes-en (fortune-mod's cookie files collect quotations whose rights are
# unclear; only the program is BSD) and fortunes-it (declares itself "freeware (public
# domain)" for a collection of quotations, without a licence from their authors).

SOURCES = {"calib.txt": "validation", "test.txt": "test"}


def split_documents(corpus: Path, split: str, sources: dict) -> list[tuple[str, str]]:
    """(part, document) for every document of a split, attribution recovered and checked."""
    text = (corpus / f"{split}.txt").read_text(encoding="utf-8")
    if text.endswith("\n"):
        text = text[:-1]  # build_corpus.py appends one newline after the last document
    docs = text.split(DOC_SEP)
    parts = [(p["part"], p["splits"][split]["documents"]) for p in sources["parts"]]
    origin = [name for name, n in parts for _ in range(n)]
    if len(origin) != len(docs):
        sys.exit(f"{split}.txt has {len(docs)} documents, sources.json says {len(origin)}: rebuild the corpus")
    order = list(range(len(docs)))
    random.Random(f"{sources['seed']}:order:{split}").shuffle(order)
    labelled = [(origin[i], d) for i, d in zip(order, docs)]
    for p in sources["parts"]:
        got = sum(len(d.encode()) for name, d in labelled if name == p["part"])
        if got != p["splits"][split]["bytes"]:
            sys.exit(
                f"part {p['part']}: {got} bytes in {split}.txt, sources.json says "
                f"{p['splits'][split]['bytes']}: the attribution does not hold, rebuild the corpus"
            )
    return labelled


def cut(doc: str, limit: int) -> str:
    """The document's first `limit` bytes or fewer, ending at a line end when there is one."""
    raw = doc.encode()
    if len(raw) <= limit:
        return doc
    head = raw[:limit].decode("utf-8", errors="ignore")
    nl = head.rfind("\n")
    return head[:nl] if nl > limit // 4 else head


def select(
    labelled: list[tuple[str, str]], sources: dict, total: int, doc_bytes: int, seed: int
) -> list[tuple[str, str]]:
    train = {p["part"]: p["splits"]["train"]["bytes"] for p in sources["parts"] if p["part"] in ALLOWED}
    share = sum(train.values())
    chosen = []
    for part, train_bytes in train.items():
        target = total * train_bytes / share
        size = 0
        for name, doc in labelled:  # the split's own shuffled order
            if name != part or size >= target:
                continue
            piece = cut(doc, min(doc_bytes, max(int(target - size), 200)))
            chosen.append((part, piece))
            size += len(piece.encode())
    random.Random(f"{seed}:eval-order").shuffle(chosen)
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, default=Path("artifacts/corpus"))
    ap.add_argument("--out", type=Path, default=Path("edgemoe/default_model"))
    ap.add_argument("--bytes", type=int, default=150_000, help="about this many bytes per file")
    ap.add_argument("--doc-bytes", type=int, default=6_000, help="cut documents to at most this many bytes")
    args = ap.parse_args()
    sources = json.loads((args.corpus / "sources.json").read_text(encoding="utf-8"))
    args.out.mkdir(parents=True, exist_ok=True)
    packages = {p["part"]: p["packages"] for p in sources["parts"]}
    rows: dict[str, dict[str, list[int]]] = {}
    summary = []
    for fname, split in SOURCES.items():
        chosen = select(
            split_documents(args.corpus, split, sources), sources, args.bytes, args.doc_bytes, sources["seed"]
        )
        data = DOC_SEP.join(d for _, d in chosen) + "\n"
        (args.out / fname).write_text(data, encoding="utf-8")
        for part, d in chosen:
            r = rows.setdefault(part, {}).setdefault(fname, [0, 0])
            r[0] += 1
            r[1] += len(d.encode())
        digest = hashlib.sha256(data.encode()).hexdigest()
        summary.append(
            f"- `{fname}`: {len(chosen)} documents, {len(data.encode())} bytes, from the corpus's "
            f"{split} split; sha256 `{digest}`"
        )
        print(f"{args.out / fname}: {len(chosen)} documents, {len(data.encode())} bytes")
    lines = [
        "# calib.txt and test.txt",
        "",
        "Calibration (`edgemoe profile`, `edgemoe convert --bits auto`) and evaluation (`edgemoe eval`) text",
        "for the default model, cut by `tools/corpus/make_eval_texts.py` from the validation and test splits",
        "of the training corpus (`tools/corpus/build_corpus.py`, seed "
        f"{sources['seed']}); no document of either file is in the training split.",
        f"Documents are separated by a line holding only `\\x1e` and cut to at most {args.doc_bytes} bytes.",
        "",
        *summary,
        "",
        "Every part below is text from a Debian 12 package, redistributed under that package's licence",
        "(full texts: `/usr/share/doc/<package>/copyright` and `/usr/share/common-licenses/` on Debian).",
        "",
        "| part | packages | licence | calib.txt docs / bytes | test.txt docs / bytes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for part in ALLOWED:
        if part not in rows:
            continue
        pk = ", ".join(f"{p['name']} {p['version']}" for p in packages[part])
        cells = [f"{rows[part].get(f, [0, 0])[0]} / {rows[part].get(f, [0, 0])[1]}" for f in SOURCES]
        lines.append(f"| {part} | {pk} | {ALLOWED[part]} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        "Left out on purpose: the English fortunes (quotations whose rights are unclear; only the",
        "fortune program is BSD) and the Italian fortunes (a quotation collection declared",
        '"freeware (public domain)" without its authors\' licence).',
        "",
    ]
    (args.out / "TEXTS.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"{args.out / 'TEXTS.md'}")


if __name__ == "__main__":
    main()
