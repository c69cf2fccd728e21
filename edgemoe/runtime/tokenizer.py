"""A model directory's tokenizer: Hugging Face tokenizer.json, read with the `tokenizers` library."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as _Tok

from ..errors import TokenizerError


class Tokenizer:
    """A Hugging Face tokenizer.json read with the `tokenizers` library."""

    def __init__(self, model_dir: Path):
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise TokenizerError(
                f"{model_dir} has no tokenizer.json: pass token ids instead of text, or convert a checkpoint "
                "that carries its tokenizer (tokenizer.json next to config.json)"
            )
        self._tok = _Tok.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)
