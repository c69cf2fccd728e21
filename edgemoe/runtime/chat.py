"""Chat templates: the checkpoint's own Jinja template (kept in the model directory by the
converter), rendered the way transformers' apply_chat_template renders it, or a plain
transcript for models that have none (the default model)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import ChatTemplateError

TEMPLATE_FILE = "chat_template.jinja"  # what transformers 5 writes beside the tokenizer
TEMPLATE_DIR = "additional_chat_templates"  # further named templates, one NAME.jinja each
CONFIG_FILE = "tokenizer_config.json"  # older checkpoints: "chat_template", a string or [{name, template}]
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# For a model without a template (the default model is a plain language model): a transcript
# it can continue, "User: ...\nAssistant:", stopped where it starts the next speaker's line.
FALLBACK_TEMPLATE = (
    "{{- bos_token or '' -}}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
FALLBACK_STOP = ("\nUser:", "\nSystem:", "\nAssistant:")


class ChatTemplate:
    """A Jinja chat template and the special tokens it may name (bos_token, eos_token, ...).

    render() gives the text transformers' apply_chat_template(..., tokenize=False) gives;
    its tokens are that text encoded without the tokenizer's own special tokens (the
    template writes them). `stop` holds the strings that end a reply (the fallback's next
    speaker; a real template ends replies with EOS, which stops generation anyway)."""

    def __init__(
        self, source: str, special_tokens: Mapping[str, str] | None = None, name: str = "", stop: Sequence[str] = ()
    ):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self.name = name  # where it came from, for messages
        self.stop = list(stop)
        self.is_fallback = source == FALLBACK_TEMPLATE
        try:
            self._template = _compile(source)
        except Exception as e:  # jinja2's TemplateSyntaxError and friends
            raise ChatTemplateError(f"the chat template {name or ''} does not parse: {e}") from None

    @classmethod
    def from_model_dir(cls, path: str | Path, name: str | None = None) -> ChatTemplate:
        """The model directory's template (chat_template.jinja, a named one from
        additional_chat_templates/, or tokenizer_config.json's chat_template), or the
        plain-transcript fallback when it has none."""
        path = Path(path)
        config = _read_json(path / CONFIG_FILE)
        special = _special_tokens(config, _read_json(path / "special_tokens_map.json"))
        templates = _templates(path, config)
        if not templates:
            if name:
                raise ChatTemplateError(f"{path} has no chat template named {name!r}: it has none at all")
            return cls(FALLBACK_TEMPLATE, special, "fallback (User:/Assistant: transcript)", FALLBACK_STOP)
        if name is None:
            if "default" not in templates:
                raise ChatTemplateError(
                    f"{path} has several chat templates and none is the default: name one of {sorted(templates)}"
                )
            name = "default"
        if name not in templates:
            raise ChatTemplateError(f"{path} has no chat template named {name!r}: choose one of {sorted(templates)}")
        return cls(templates[name], special, f"{path.name}:{name}")

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The conversation as the model's prompt text. Keys whose value is None are left
        out of each message (as transformers does); a template's raise_exception becomes a
        ChatTemplateError with the template's own message."""
        import jinja2

        chat = []
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise ChatTemplateError(f"message {i} is not an object with a role and content: {message!r}")
            chat.append({k: v for k, v in message.items() if v is not None})
        context = {**self.special_tokens, **kwargs}
        try:
            return self._template.render(
                messages=chat,
                tools=list(tools) if tools is not None else None,
                documents=list(documents) if documents is not None else None,
                add_generation_prompt=add_generation_prompt,
                **context,
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template refused the conversation: {e}") from None


@lru_cache(maxsize=8)
def _compile(source: str) -> Any:
    """A template compiled in a sandbox with what chat templates expect of transformers:
    trim_blocks and lstrip_blocks, loop controls, a tojson that does not escape HTML,
    raise_exception, strftime_now, and the {% generation %} marker (rendered as its body)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %} marks the assistant's tokens for training
        masks; for inference only its body matters."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        out = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ChatTemplateError(f"{path} is not readable JSON ({e}): convert the checkpoint again") from None
    return out if isinstance(out, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json gives it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(config: dict[str, Any], special_map: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key in SPECIAL_TOKENS:
        text = _token_text(config.get(key)) or _token_text(special_map.get(key))
        if text is not None:
            out[key] = text
    return out


def _templates(path: Path, config: dict[str, Any]) -> dict[str, str]:
    """name -> template source, in transformers' order: chat_template.jinja and
    additional_chat_templates/*.jinja replace tokenizer_config.json's."""
    found: dict[str, str] = {}
    if (path / TEMPLATE_FILE).is_file():
        found["default"] = (path / TEMPLATE_FILE).read_text(encoding="utf-8")
    if (path / TEMPLATE_DIR).is_dir():
        for f in sorted((path / TEMPLATE_DIR).glob("*.jinja")):
            found[f.stem] = f.read_text(encoding="utf-8")
    if found:
        return found
    value = config.get("chat_template")
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t and "template" in t}
    return {}
