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

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; add_special_tokens=False leaves out what the tokenizer's
        post-processor adds (a BOS), as for a chat template's rendering, which has its own."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)
