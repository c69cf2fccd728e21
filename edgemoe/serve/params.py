"""The fields of an OpenAI completions or chat-completions request, checked one by one: a wrong
type or value is a RequestError whose message names the field and what it accepts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_STOP = 4  # stop strings per request, as OpenAI allows


class RequestError(Exception):
    """A request the server refuses: an HTTP status, a message saying what is wrong, and
    the field it is about (OpenAI's error object)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass
class Sampling:
    """What both endpoints accept besides the prompt."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(body: Mapping[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v):
        raise RequestError(f"{name} must be a number between {lo:g} and {hi:g}, got {v!r}", name)
    if not lo <= v <= hi:
        raise RequestError(f"{name} must be between {lo:g} and {hi:g}, got {v!r}", name)
    return float(v)


def _flag(body: Mapping[str, Any], name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise RequestError(f"{name} must be true or false, got {v!r}", name)
    return v


def sampling(body: Mapping[str, Any], context: int) -> Sampling:
    """The sampling fields of a request body (a JSON object). context: the server's context length."""
    out = Sampling()
    for name in ("max_tokens", "max_completion_tokens"):
        v = body.get(name)
        if v is None:
            continue
        if not _is_int(v):
            raise RequestError(f"{name} must be an integer, got {v!r}", name)
        if not 1 <= v <= context:
            raise RequestError(f"{name} must be between 1 and the context length {context}, got {v}", name)
        out.max_tokens = v
    out.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    out.top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if out.top_p == 0.0:
        out.temperature = 0.0  # nothing but the likeliest token: greedy
        out.top_p = 1.0
    seed = body.get("seed")
    if seed is not None and not (_is_int(seed) and 0 <= seed < 2**63):
        raise RequestError(f"seed must be a non-negative integer, got {seed!r}", "seed")
    out.seed = seed
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise RequestError(f"stop must be a string or a list of up to {MAX_STOP} strings, got {stop!r}", "stop")
        if len(stop) > MAX_STOP:
            raise RequestError(f"stop takes at most {MAX_STOP} strings, got {len(stop)}", "stop")
        out.stop = [s for s in stop if s]
    out.stream = _flag(body, "stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise RequestError(f'stream_options must be an object such as {{"include_usage": true}}, got {opts!r}')
        out.include_usage = _flag(opts, "include_usage")
    out.ignore_eos = _flag(body, "ignore_eos")
    n = body.get("n")
    if n is not None and n != 1:
        raise RequestError(f"n must be 1: this server makes one completion per request, got {n!r}", "n")
    return out


def completion_prompt(body: Mapping[str, Any]) -> str | list[int]:
    """/v1/completions' prompt: a string, a list of one string, or a list of token ids."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise RequestError("prompt is empty: give some text", "prompt")
        return p
    if isinstance(p, list) and p and all(_is_int(t) for t in p):
        return list(p)
    if p is None:
        raise RequestError("prompt is missing: give a string or a list of token ids", "prompt")
    raise RequestError(
        "prompt must be a string, a list of one string, or a non-empty list of token ids "
        "(several prompts per request are not served)",
        "prompt",
    )


def chat_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """/v1/chat/completions' messages: objects with a role and a content (a string, or a list
    of text parts, joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(
            'messages must be a non-empty list of {"role": ..., "content": ...} objects, got '
            f"{type(messages).__name__ if messages is not None else 'nothing'}",
            "messages",
        )
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f'{where} must be an object {{"role": ..., "content": ...}}, got {m!r}', where)
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise RequestError(f"{where}.role must be a string such as user, assistant or system", f"{where}.role")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise RequestError(
                        f'{where}.content: this model reads text only: parts must be {{"type": "text", "text": ...}}',
                        f"{where}.content",
                    )
                parts.append(part["text"])
            content = "".join(parts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise RequestError(f"{where}.content must be a string or a list of text parts", f"{where}.content")
        out.append({**{k: v for k, v in m.items() if k not in ("role", "content")}, "role": role, "content": content})
    return out
