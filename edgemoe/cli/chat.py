"""`edgemoe chat [MODEL]`: an interactive chat in the terminal, streamed, with the model's chat
template. /reset forgets the conversation, /stats prints the runtime's statistics, /quit ends."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from ..runtime.engine import Model, load
from ..runtime.stats import format_stats
from .common import Parser, add_model_args, load_args, number, resolve_model, whole

HELP = "commands: /reset forgets the conversation, /stats prints the runtime's statistics, /quit ends (or Ctrl-D)"


def build_parser() -> Parser:
    p = Parser(prog="edgemoe chat", description="Chat with a model in the terminal. " + HELP)
    add_model_args(p)
    p.add_argument("--system", default=None, help="a system message that starts the conversation")
    p.add_argument("-n", "--max-tokens", type=whole(1), default=256, help="longest reply in tokens (default 256)")
    p.add_argument("--temperature", type=number(0.0), default=0.8, help="sampling temperature (default 0.8; 0: greedy)")
    p.add_argument(
        "--top-p", type=number(0.0, 1.0, above=True), default=0.95, help="nucleus sampling mass (default 0.95)"
    )
    p.add_argument("--seed", type=whole(0, 2**63 - 1), default=None, help="sampling seed (default: random)")
    return p


class Chat:
    """A conversation with a model: the messages so far, and one reply at a time streamed to out."""

    def __init__(self, model: Model, args: argparse.Namespace, out: TextIO):
        self.model, self.args, self.out = model, args, out
        self.context = int(model.manifest["config"].get("max_position_embeddings") or 2048)
        self.messages: list[dict[str, Any]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.args.system}] if self.args.system else []

    def _prompt(self) -> list[int]:
        """The conversation's tokens; the oldest turns go first when it would not leave room
        for a reply."""
        while True:
            ids = self.model.encode_chat(self.messages)
            first = 1 if self.messages[0]["role"] == "system" else 0
            if len(ids) + self.args.max_tokens <= self.context or len(self.messages) - first <= 1:
                return ids[-(self.context - 1) :]
            del self.messages[first : first + 2]  # one exchange, the oldest
            print("[the oldest exchange was dropped to fit the context]", file=sys.stderr)

    def reply(self, text: str) -> str:
        self.messages.append({"role": "user", "content": text})
        template = self.model.chat_template
        ids = self._prompt()
        steps = self.model.stream(
            ids,
            max_new_tokens=max(1, min(self.args.max_tokens, self.context - len(ids))),
            temperature=self.args.temperature,
            top_p=self.args.top_p,
            seed=self.args.seed,
            stop=template.stop,
        )
        pieces: list[str] = []
        for step in steps:
            piece = step.text
            if template.is_fallback and not "".join(pieces).strip():
                piece = piece.lstrip()  # the transcript's reply follows "Assistant:"
            if piece:
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()
        self.out.write("\n")
        answer = "".join(pieces)
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def main(argv: Sequence[str] | None = None, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    stdin, out = stdin or sys.stdin, out or sys.stdout
    model = load(resolve_model(args.model), **load_args(args))
    chat = Chat(model, args, out)
    template = model.chat_template
    print(f"[{model.path.name}, chat template: {template.name}] {HELP}", file=sys.stderr)
    try:
        while True:
            out.write("> ")
            out.flush()
            line = stdin.readline()
            if not line:  # end of input
                out.write("\n")
                return 0
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit"):
                return 0
            if text == "/reset":
                chat.reset()
                model.reset()
                print("[conversation forgotten]", file=out)
            elif text == "/stats":
                print(format_stats(model.stats()), file=out)
            elif text.startswith("/"):
                print(f"[unknown command {text.split()[0]}] {HELP}", file=out)
            else:
                chat.reply(text)
    finally:
        model.close()
