"""`hybridmoe serve`: load the model and adapters once, bind the port, run uvicorn.

User errors (a bad model or adapter directory, an adapter for another model, a port in use, a bad flag) raise
:class:`~hybridmoe.errors.HybridMoEError` before the server starts, so the CLI prints one line and exits 2. The port
is bound *before* the (possibly long) model load, so a port clash is reported at once.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from hybridmoe.errors import ConfigError, HybridMoEError

API_KEY_ENV = "HYBRIDMOE_API_KEY"
log = logging.getLogger("hybridmoe.serve")


def parse_adapters(specs: list[str] | None, base_name: str) -> dict[str, str]:
    """``NAME=DIR`` (or just ``DIR``, named after its folder) -> {name: dir}, names unique and not the base's."""
    out: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name, spec
        if not name or not path:
            raise ConfigError(f"--adapter '{spec}' is not NAME=DIR")
        if name in out or name == base_name:
            raise ConfigError(f"--adapter name '{name}' is used twice (the base model is served as '{base_name}'); "
                              "give each adapter its own NAME=DIR")
        out[name] = path
    return out


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for uvicorn, or a one-line error (port in use, no permission, unknown host)."""
    if not 0 <= port < 65536:
        raise ConfigError(f"--port must be in 0..65535, got {port}")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ConfigError(f"--host '{host}' is not a valid address ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT sockets
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise HybridMoEError(f"port {port} on {host} is already in use; pass another --port or stop the "
                                 "server using it") from None
        if e.errno == errno.EACCES:
            raise HybridMoEError(f"no permission to bind {host}:{port} (ports below 1024 need root); pass "
                                 "--port 8000 or higher") from None
        raise HybridMoEError(f"cannot bind {host}:{port}: {e.strerror}") from None
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_app(model_dir: str | os.PathLike, adapters: dict[str, str] | None = None, *, device=None, dtype=None,
              expert_dtype=None, chat_template: str | None = None, model_name: str | None = None, api_key: str | None = None,
              max_batch_size: int = 16, max_prefill_tokens: int = 8192, prefill_chunk_tokens: int | None = 2048,
              progress: bool = False, stream_slots: int = 2, stream_cpu_share: float | None = None,
              resident_expert_layers: int = 0, max_loras: int = 8, allow_runtime_lora: bool = False,
              cuda_graphs: bool | None = None, compile_decode: bool | None = None,
              lora_root: str | os.PathLike | None = None, max_request_bytes: int = 4 * 2**20,
              request_timeout: float | None = 600.0, log_stats_interval: float = 10.0):
    """Load the base model once and every adapter under its name; returns the FastAPI app (engine not started:
    the app's lifespan starts it). ``model_name`` (default: the model folder's name) selects the base model.
    ``allow_runtime_lora`` turns on /v1/load_lora_adapter and /v1/unload_lora_adapter for directories under
    ``lora_root``; ``max_loras`` caps the adapters loaded at once (``adapters`` included). ``cuda_graphs``: decode
    steps replay CUDA graphs, a lone request on chat's static-cache decoder, several on the batch decoder (default:
    on CUDA). ``compile_decode``: the model's ``settings.compile_decode`` (None: its default, from
    ``HYBRIDMOE_COMPILE_DECODE``). The engine warms up before the app is returned (Engine.warm_up)."""
    from hybridmoe.loading import load_model, load_tokenizer

    from .adapters import AdapterSet
    from .app import ServeConfig, create_app
    from .engine import Engine

    if max_batch_size < 1:
        raise ConfigError(f"--max-batch-size must be >= 1, got {max_batch_size}")
    if max_prefill_tokens < 1:
        raise ConfigError(f"--max-prefill-tokens must be >= 1, got {max_prefill_tokens}")
    if prefill_chunk_tokens is not None and prefill_chunk_tokens < 1:
        raise ConfigError(f"--prefill-chunk-tokens must be >= 1, got {prefill_chunk_tokens}")
    if max_request_bytes < 1024:
        raise ConfigError(f"--max-request-bytes must be at least 1024, got {max_request_bytes}")
    if request_timeout is not None and request_timeout < 0:
        raise ConfigError(f"--request-timeout must be >= 0 seconds (0 = none), got {request_timeout}")
    if max_loras < len(adapters or {}):
        raise ConfigError(f"--max-loras is {max_loras} but {len(adapters)} --adapter flags were given; raise "
                          "--max-loras")
    if allow_runtime_lora:
        if lora_root is None:
            raise ConfigError("--allow-runtime-lora needs --lora-root DIR: adapters load only from under it")
        if not Path(lora_root).is_dir():
            raise ConfigError(f"--lora-root '{lora_root}' is not a directory")
    base_name = model_name or Path(model_dir).resolve().name
    adapters = dict(adapters or {})
    model = load_model(model_dir, device=device, dtype=dtype, expert_dtype=expert_dtype, progress=progress,
                       stream_slots=stream_slots, stream_cpu_share=stream_cpu_share,
                       resident_expert_layers=resident_expert_layers)
    if compile_decode is not None:
        model.hybridmoe.settings.compile_decode = compile_decode
    tokenizer = load_tokenizer(model_dir, chat_template)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"the tokenizer in '{model_dir}' has no chat template; pass --chat-template FILE")
    aset = AdapterSet(model)
    for name, path in adapters.items():
        aset.load(name, path)
    aset.model.eval()
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    engine = Engine(aset, tokenizer, max_batch_size, max_prefill_tokens, prefill_chunk_tokens, graph_decode=cuda_graphs)
    seconds = engine.warm_up()
    log.info("warmed up in %.1f s (%s)", seconds, "CUDA graphs captured" if engine.graph_decode else "eager decode")
    cfg = ServeConfig(base_name, context, api_key, max_request_bytes=max_request_bytes,
                      request_timeout=request_timeout or None, allow_runtime_lora=allow_runtime_lora,
                      lora_root=None if lora_root is None else str(lora_root), max_loras=max_loras,
                      log_stats_interval=log_stats_interval)
    app = create_app(engine, tokenizer, cfg)
    app.state.served_models = [base_name, *aset.names]
    return app


def run_serve(args) -> int:
    import uvicorn

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    base_name = args.model_name or Path(args.model).resolve().name
    adapters = parse_adapters(args.adapter, base_name)
    sock = bind_socket(args.host, args.port)
    try:
        app = build_app(args.model, adapters, device=args.device, dtype=args.dtype, expert_dtype=args.expert_dtype,
                        chat_template=args.chat_template,
                        model_name=args.model_name, api_key=api_key, max_batch_size=args.max_batch_size,
                        max_prefill_tokens=args.max_prefill_tokens, prefill_chunk_tokens=args.prefill_chunk_tokens,
                        stream_slots=args.stream_slots, stream_cpu_share=args.stream_cpu_share,
                        resident_expert_layers=args.resident_expert_layers, cuda_graphs=args.cuda_graphs,
                        compile_decode=args.compile_decode, max_loras=args.max_loras,
                        allow_runtime_lora=args.allow_runtime_lora, lora_root=args.lora_root,
                        max_request_bytes=args.max_request_bytes, request_timeout=args.request_timeout,
                        log_stats_interval=args.log_stats_interval, progress=True)
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    if not _is_loopback(args.host) and not api_key:
        print(f"hybridmoe serve: warning: listening on {args.host} without an API key; anyone who can reach this "
              f"port can use the model (pass --api-key or set {API_KEY_ENV})", file=sys.stderr)
    url_host = f"[{host}]" if ":" in host else host
    print(f"hybridmoe serve: http://{url_host}:{port}/v1 serving {', '.join(app.state.served_models)}",
          file=sys.stderr, flush=True)
    # on Ctrl-C / SIGTERM: stop accepting; running requests (streams included) get --shutdown-timeout seconds to
    # finish, then end with a "shutting down" error (a final event in a stream); uvicorn waits a little longer
    config = uvicorn.Config(app, log_level=args.log_level, log_config=_uvicorn_logging(args.log_level),
                            timeout_graceful_shutdown=args.shutdown_timeout + 5)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn shuts down gracefully on Ctrl-C, then re-raises it
        draining_server(config, app.state.engine, args.shutdown_timeout).run(sockets=[sock])
    print("hybridmoe serve: stopped", file=sys.stderr)
    return 0


def draining_server(config, engine, grace: float):
    """A uvicorn server that tells the engine when a graceful shutdown begins (:meth:`Engine.drain`): running
    requests get ``grace`` seconds, then end with a "shutting down" error instead of a cut connection."""
    import uvicorn  # the serve extra; imported here so that `hybridmoe.serve` imports without it

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            engine.drain(grace)
            await super().shutdown(sockets)

    return DrainingServer(config)


def _uvicorn_logging(level: str = "info") -> dict:
    """uvicorn's own log config with the access log on stderr too (logs go to stderr, like every command)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    cfg = copy.deepcopy(LOGGING_CONFIG)
    cfg["handlers"]["access"]["stream"] = "ext://sys.stderr"
    # hybridmoe.serve's own lines (throughput every --log-stats-interval s, adapter loads) go with uvicorn's
    cfg["loggers"]["hybridmoe.serve"] = {"handlers": ["default"], "level": level.upper(),
                                     "propagate": False}
    return cfg


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0) -> Iterator[str]:
    """Run ``app`` under uvicorn on a background thread (tests, benchmarks, notebooks); yields the base URL
    ``http://host:port`` once it accepts requests, and shuts it down on exit."""
    import uvicorn

    sock = bind_socket(host, port)
    server = draining_server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10),
                             app.state.engine, grace=5)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="hybridmoe-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the server did not start (see the log above)")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
