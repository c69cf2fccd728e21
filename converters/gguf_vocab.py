"""A GGUF file's tokenizer (tokenizer.ggml.* metadata) as a Hugging Face tokenizer.json.

Two vocabularies llama.cpp writes for the architectures edgemoe imports:

- `gpt2`: byte-level BPE: tokens, merges, and a pre-tokenizer named by tokenizer.ggml.pre
  whose regexes live in llama.cpp's llama-vocab.cpp (PRE_TOKENIZERS below says which
  `tokenizers` pre-tokenizer splits the same way);
- `llama`: SentencePiece BPE (Mixtral, Llama 2): tokens with scores, byte tokens <0xXX> for
  byte fallback; llama.cpp merges the adjacent pair whose joined piece has the highest score,
  which is a BPE whose merges are ranked by that score.

Control tokens (token type 3) and user-defined ones (4) become added tokens, the first special.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

# llama.cpp's token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's own regex


def _smollm() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


# tokenizer.ggml.pre -> the `tokenizers` pre-tokenizer with llama.cpp's regexes for it, and
# whether llama.cpp applies merges to a word that is already one token (ignore_merges)
PRE_TOKENIZERS: dict[str, tuple[Any, bool]] = {
    "gpt-2": (_gpt2, False),
    "olmo": (_gpt2, False),
    "mpt": (_gpt2, False),
    "smollm": (_smollm, False),
    "llama-bpe": (lambda: _split_then_bytes(_LLAMA3), True),
    "llama3": (lambda: _split_then_bytes(_LLAMA3), True),
    "qwen2": (lambda: _split_then_bytes(_QWEN2), False),
}
# llama.cpp adds BOS by default for these pre-tokenizers (and for every `llama` vocabulary)
_ADD_BOS_PRE = {"llama-bpe", "llama3"}


class UnsupportedTokenizer(Exception):
    pass


def _added_tokens(tokens: list[str], types: list[int]) -> list[AddedToken]:
    out = []
    for i, (t, k) in enumerate(zip(tokens, types)):
        if k in (CONTROL, USER_DEFINED):
            out.append((i, AddedToken(t, special=k == CONTROL, normalized=False)))
    return [a for _, a in sorted(out, key=lambda x: x[0])]


def _gpt2_tokenizer(meta: dict[str, Any], tokens: list[str], types: list[int]) -> tuple[Tokenizer, bool]:
    pre = str(meta.get("tokenizer.ggml.pre") or "default")
    if pre not in PRE_TOKENIZERS:
        raise UnsupportedTokenizer(
            f"pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not one edgemoe rebuilds "
            f"({', '.join(sorted(PRE_TOKENIZERS))})"
        )
    make_pre, ignore_merges = PRE_TOKENIZERS[pre]
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = make_pre()
    tok.decoder = decoders.ByteLevel()
    return tok, pre in _ADD_BOS_PRE


def _llama_tokenizer(meta: dict[str, Any], tokens: list[str], types: list[int]) -> tuple[Tokenizer, bool]:
    scores = [float(s) for s in meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)]
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    # every split of a normal piece into two pieces of the vocabulary is a merge, ranked by the
    # joined piece's score (llama.cpp's SentencePiece tokenizer picks the highest score first)
    ranked = []
    for i, t in enumerate(tokens):
        if types[i] != NORMAL or len(t) < 2:
            continue
        for cut in range(1, len(t)):
            a, b = t[:cut], t[cut:]
            if a in vocab and b in vocab:
                ranked.append((-scores[i], i, cut, a, b))
    ranked.sort()
    unk = next((tokens[i] for i, k in enumerate(types) if k == UNKNOWN), None)
    tok = Tokenizer(
        models.BPE(vocab, [(a, b) for *_, a, b in ranked], unk_token=unk, byte_fallback=True, fuse_unk=True)
    )
    add_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    norms = [normalizers.Prepend("▁")] if add_prefix else []
    tok.normalizer = normalizers.Sequence([*norms, normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            *([decoders.Strip(" ", 1, 0)] if add_prefix else []),
        ]
    )
    return tok, True


BUILDERS = {"gpt2": _gpt2_tokenizer, "llama": _llama_tokenizer}


def build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """The GGUF metadata's tokenizer as a `tokenizers.Tokenizer`; UnsupportedTokenizer names what is missing."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise UnsupportedTokenizer("the file has no tokenizer.ggml.tokens")
    if kind not in BUILDERS:
        raise UnsupportedTokenizer(f"tokenizer model {kind!r} (tokenizer.ggml.model) is not gpt2 or llama")
    tokens = [str(t) for t in tokens]
    types = [int(t) for t in meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)]
    tok, add_bos = BUILDERS[kind](meta, tokens, types)
    tok.add_tokens(_added_tokens(tokens, types))
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    specials, single = [], "$A"
    if add_bos and bos is not None:
        specials.append((tokens[int(bos)], int(bos)))
        single = f"{tokens[int(bos)]} {single}"
    if add_eos and eos is not None:
        specials.append((tokens[int(eos)], int(eos)))
        single = f"{single} {tokens[int(eos)]}"
    if specials:
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=list(dict.fromkeys(specials)))
    return tok


def special_ids(meta: dict[str, Any]) -> dict[str, Any]:
    """bos id and the ids that end generation (eos, and end-of-turn / end-of-message when the file names them)."""
    eos = []
    for key in ("eos", "eot", "eom"):
        v = meta.get(f"tokenizer.ggml.{key}_token_id")
        if v is not None and int(v) not in eos:
            eos.append(int(v))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return {"bos_token_id": None if bos is None else int(bos), "eos_token_ids": eos}


def write_tokenizer(meta: dict[str, Any], dst: Path) -> tuple[list[str], dict[str, Any]]:
    """tokenizer.json and tokenizer_config.json (with the chat template) from the GGUF metadata into
    dst; the files written and the special ids. An unsupported vocabulary is a warning (the model
    then takes token ids), not an error."""
    special = special_ids(meta)
    try:
        tok = build_tokenizer(meta)
    except UnsupportedTokenizer as e:
        print(f"edgemoe convert: warning: no tokenizer.json: {e}; the model will need token ids", file=sys.stderr)
        return [], special
    tok.save(str(dst / "tokenizer.json"))
    tokens = meta["tokenizer.ggml.tokens"]
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    if special["bos_token_id"] is not None:
        cfg["bos_token"] = str(tokens[special["bos_token_id"]])
    if special["eos_token_ids"]:
        cfg["eos_token"] = str(tokens[special["eos_token_ids"][0]])
    if meta.get("tokenizer.chat_template"):
        cfg["chat_template"] = str(meta["tokenizer.chat_template"])
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    return ["tokenizer.json", "tokenizer_config.json"], special
