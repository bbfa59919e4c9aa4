"""`nbdiff serve [MODEL]`: an OpenAI-compatible server whose requests share the block decoder's batches."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from nbdiff_cli.console import err_console
from nbdiff_cli.models import load_for_decoding
from nbdiff_cli.options import Hardware, ModelArg, decoding_options

SERVER = "Server"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_NAME = "nbdiff-default"


def _need_server_packages() -> None:
    from importlib.util import find_spec

    from nbdiff.errors import NBDiffError

    missing = [name for name in ("fastapi", "uvicorn") if find_spec(name) is None]
    if missing:
        raise NBDiffError(f"nbdiff serve needs {' and '.join(missing)}", "pip install 'nbdiff[serve]'")


def bind(host: str, port: int):
    """A listening socket on host:port, or one line that says what to do."""
    import socket

    from nbdiff.errors import NBDiffError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise NBDiffError(f"cannot resolve --host {host}: {exc.strerror}", "try --host 127.0.0.1") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise NBDiffError(f"cannot listen on {host}:{port}: {exc.strerror}", "pass another --port (0 picks a free one)") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def build(model: Optional[str], options, hardware: Hardware, *, name: Optional[str], max_batch: int, max_queue: int,
          request_timeout: float, api_key: Optional[str], cors: list[str], log_prompts: bool, prefix_cache_mb: int = 512):
    """Load the model, start the engine and make the app. Returns (app, engine, settings, notes)."""
    import time
    from dataclasses import replace

    from nbdiff.api import resolve_options
    from nbdiff.loading import context_length
    from nbdiff.serve.engine import Engine
    from nbdiff.serve.protocol import ServerSettings
    from nbdiff_cli.serve.server import make_app

    mdl, tok = load_for_decoding(model, hardware.device, hardware.dtype, hardware.quantize, exact=options.exact,
                                  served=True)
    defaults, notes = resolve_options(mdl, options)
    settings = ServerSettings(
        model_id=name or (os.path.basename(os.path.normpath(model)) if model else DEFAULT_NAME),
        defaults=replace(defaults, seed=None), context=context_length(mdl),
        time_limit=request_timeout if request_timeout > 0 else None, created=int(time.time()),
    )
    engine = Engine(mdl, tok, max_batch=max_batch, max_queue=max_queue, prefix_cache_bytes=prefix_cache_mb << 20).start()
    app = make_app(engine, settings, mdl, tok, api_key=api_key, cors=cors, log_prompts=log_prompts)
    return app, engine, settings, notes


def _log_setup() -> None:
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    logger = logging.getLogger("nbdiff.serve")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


@decoding_options(system=False)
def serve(
    model: ModelArg = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (127.0.0.1: this machine only).", rich_help_panel=SERVER)] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: any free port).", rich_help_panel=SERVER)] = 8000,
    name: Annotated[Optional[str], typer.Option("--model-name", help="The model id clients send (default: the folder's name).", rich_help_panel=SERVER)] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="NBDIFF_API_KEY", show_envvar=True,
                                                   help="Require 'Authorization: Bearer KEY' on every route but /health.", rich_help_panel=SERVER)] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Rows decoded together (1 = one request at a time).", rich_help_panel=SERVER)] = 8,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Requests that may wait for a row; more get 429 with Retry-After.", rich_help_panel=SERVER)] = 64,
    prefix_cache: Annotated[int, typer.Option("--prefix-cache", help="MiB of keys/values kept from recent prompts and replies, so requests that begin the same way (system prompt, next chat turn) prefill only what is new (0 = off).", rich_help_panel=SERVER)] = 512,
    request_timeout: Annotated[float, typer.Option("--request-timeout", help="Seconds a request may take, queue included (0 = no limit).", rich_help_panel=SERVER)] = 300.0,
    cors: Annotated[Optional[str], typer.Option("--cors", help="Comma-separated origins browsers may call from (default: none).", rich_help_panel=SERVER)] = None,
    log_prompts: Annotated[bool, typer.Option("--log-prompts", help="Log prompt and reply text (off: counts and timings only).", rich_help_panel=SERVER)] = False,
    *,
    options=None,
    hardware: Hardware = Hardware(),
) -> None:
    """Serve a model over OpenAI's API (chat and text completions, streaming); concurrent requests share batches.

    The decoding flags are the server's defaults; a request overrides temperature, top_p, seed and
    max_tokens, and nbdiff's own settings in an `nbdiff` object (block_size, threshold, exact, ...).
    """
    from nbdiff.errors import NBDiffError

    _need_server_packages()
    import uvicorn

    if max_batch < 1 or max_queue < 0 or prefix_cache < 0:
        raise NBDiffError(f"--max-batch must be >= 1 and --max-queue, --prefix-cache >= 0, got {max_batch}, {max_queue} "
                          f"and {prefix_cache}")
    sock = bind(host, port)
    origins = [o.strip() for o in (cors or "").split(",") if o.strip()]
    app, engine, settings, notes = build(model, options, hardware, name=name, max_batch=max_batch, max_queue=max_queue,
                                         prefix_cache_mb=prefix_cache,
                                         request_timeout=request_timeout, api_key=api_key or None, cors=origins,
                                         log_prompts=log_prompts)
    if engine.model.device.type == "cpu":
        # Packed lanes (nbdiff.serve.packed) attend under a mask with many queries, where transformers
        # would copy every key/value head once per query head; torch's CPU kernel takes grouped heads
        # under a mask directly (the same values, checked in tests/test_serve.py). This process only.
        os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")
    _log_setup()
    for note in notes:
        err_console.print(f"note: {note}", style="yellow")
    if host not in LOOPBACK and not api_key:
        err_console.print(f"note: listening on {host} without --api-key: anyone who reaches this port can use the model",
                          style="yellow")
    where = sock.getsockname()
    from nbdiff.loading import dtype_name

    err_console.print(f"serving '{settings.model_id}' on http://{host}:{where[1]}/v1 (block size "
                      f"{settings.defaults.block_size}, {dtype_name(engine.model)}, up to {max_batch} rows together); Ctrl-C stops", style="bold")
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)).run(sockets=[sock])
    finally:
        engine.close()
