#!/usr/bin/env python3
"""Train the byte-level BPE tokenizer of edgemoe's default model and tokenize the corpus.

    python tools/train/train_tokenizer.py --corpus artifacts/corpus --out artifacts/tokenizer

Writes tokenizer.json + tokenizer_config.json (PreTrainedTokenizerFast.save_pretrained),
and {train,validation,test}.bin: uint16 token ids, each document as <s> ... </s>, plus meta.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

DOC_SEP = "\n\x1e\n"  # as written by tools/corpus/build_corpus.py
BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def read_docs(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [d for d in text.rstrip("\n").split(DOC_SEP) if d]


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # digits one by one, then GPT-2 style byte-level pre-tokenization
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    bos_id = tok.token_to_id(BOS)
    # every encoded text starts with <s>, as in training
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def encode_split(tok: Tokenizer, docs: list[str], bos: int, eos: int) -> np.ndarray:
    out = []
    for i in range(0, len(docs), 2048):
        for enc in tok.encode_batch(docs[i : i + 2048]):  # post-processor adds <s>
            out.append(np.asarray(enc.ids + [eos], dtype=np.uint16))
    arr = np.concatenate(out)
    assert arr[0] == bos
    return arr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, default=Path("artifacts/corpus"))
    ap.add_argument("--out", type=Path, default=Path("artifacts/tokenizer"))
    ap.add_argument("--vocab-size", type=int, default=8192)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    train_docs = read_docs(args.corpus / "train.txt")
    tok = train_tokenizer(train_docs, args.vocab_size)
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    hf.save_pretrained(args.out)

    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    meta = {
        "vocab_size": tok.get_vocab_size(),
        "bos_id": bos,
        "eos_id": eos,
        "pad_id": tok.token_to_id(PAD),
        "splits": {},
    }
    for split in ("train", "validation", "test"):
        docs = train_docs if split == "train" else read_docs(args.corpus / f"{split}.txt")
        ids = encode_split(tok, docs, bos, eos)
        ids.tofile(args.out / f"{split}.bin")
        n_bytes = sum(len(d.encode()) for d in docs)
        meta["splits"][split] = {
            "documents": len(docs),
            "tokens": int(len(ids)),
            "bytes": n_bytes,
            "bytes_per_token": round(n_bytes / len(ids), 3),
        }
        print(
            f"{split}: {len(docs)} docs, {len(ids) / 1e6:.2f}M tokens, {n_bytes / len(ids):.2f} bytes/token", flush=True
        )
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    sample = "def main():\n    print('Bonjour, le monde!')  # Der Computer sagt: 42"
    print("vocab", tok.get_vocab_size(), "| sample:", hf.tokenize(sample))


if __name__ == "__main__":
    main()
