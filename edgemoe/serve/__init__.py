"""An OpenAI-compatible HTTP server for one loaded model, with a live web view of its expert
cache (docs/serve.md). Needs the `serve` extra (starlette, uvicorn)."""

from __future__ import annotations

import socket
import sys
from typing import TextIO

from ..errors import EdgeMoEError
from ..runtime.engine import Model
from .api import Server, create_app

DEFAULT_CONTEXT = 2048


def context_length(model: Model, requested: int | None = None) -> int:
    """The context the server allows: the one requested, else the model's
    max_position_embeddings capped at DEFAULT_CONTEXT (memory_needed grows with it)."""
    trained = model.manifest["config"].get("max_position_embeddings")
    if requested is not None:
        if requested < 2:
            raise ValueError(f"--context must be at least 2 tokens, got {requested}")
        if trained and requested > trained:
            raise ValueError(f"--context {requested} is beyond what the model was trained for ({trained} tokens)")
        return requested
    return min(int(trained), DEFAULT_CONTEXT) if trained else DEFAULT_CONTEXT


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except (OSError, OverflowError) as e:
        sock.close()
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise EdgeMoEError(
            f"cannot listen on {host}:{port}: {reason}: choose another --port (0 picks a free one) or --host"
        ) from None
    return sock


def run(
    server: Server,
    host: str = "127.0.0.1",
    port: int = 8000,
    log: TextIO = sys.stderr,
    sock: socket.socket | None = None,
) -> None:
    """Serve until interrupted on sock (default: bind(host, port)); prints the address."""
    import uvicorn

    sock = sock or bind(host, port)
    host = sock.getsockname()[0]
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"edgemoe serve: {server.name} on http://{shown}:{bound} (demo at /, API at /v1, context {server.context} "
        f"tokens, memory needed {server.memory_needed / 1e6:.0f} MB)",
        file=log,
        flush=True,
    )
    config = uvicorn.Config(create_app(server), log_level="warning", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


__all__ = ["Server", "create_app", "run", "context_length", "bind"]
