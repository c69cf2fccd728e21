"""`edgemoe serve [MODEL]`: an OpenAI-compatible API and a live demo page for one model."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..errors import EdgeMoEError
from ..runtime.engine import load
from .common import Parser, add_model_args, load_args, resolve_model, whole

# docs/benchmarks/serve.md measures queued (1) against batched decoding
DEFAULT_BATCH = 1


def build_parser() -> Parser:
    p = Parser(
        prog="edgemoe serve",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
        "/v1/models), with /health, /metrics and a live demo of the expert cache at /. Requests share the one "
        "model within its memory budget: queued and run one at a time, or decoded together (--batch).",
    )
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=whole(0, 65535), default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("EDGEMOE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default: $EDGEMOE_API_KEY, else no key)",
    )
    p.add_argument("--name", default=None, help="the model's name in the API (default: the model directory's name)")
    p.add_argument(
        "--context",
        type=whole(1),
        default=None,
        help="longest prompt plus completion, in tokens (default: the model's, at most 2048)",
    )
    p.add_argument("--max-queue", type=whole(0), default=256, help="requests that may wait; more get 503 (default 256)")
    p.add_argument(
        "--batch",
        type=whole(1, 256),
        default=DEFAULT_BATCH,
        help="requests decoded together, each step reading a routed expert once for all of them; each holds a "
        f"KV cache of --context tokens, counted in the memory needed (default {DEFAULT_BATCH}; 1: one at a time)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .. import serve
    except ImportError as e:
        raise EdgeMoEError(
            f"the server needs the serve extra ({e.name} is missing): pip install 'edgemoe[serve]'"
        ) from None
    sock = serve.bind(args.host, args.port)  # a taken port is an error before a long load
    path = resolve_model(args.model)
    model = load(path, **load_args(args))
    try:
        context = serve.context_length(model, args.context)
    except ValueError as e:
        raise EdgeMoEError(str(e)) from None
    name = args.name or os.path.basename(os.path.normpath(path))
    server = serve.Server(model, name, context, api_key=args.api_key, max_queue=args.max_queue, batch=args.batch)
    try:
        serve.run(server, sock=sock)
    finally:
        server.close()
        model.close()
    return 0
