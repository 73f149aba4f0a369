"""`expertyard serve`: the OpenAI-compatible HTTP server (docs/serving.md)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys

from expertyard.disagg.launch import exit_now
from expertyard.engine.llm_engine import EngineConfig
from expertyard.entrypoints.common import add_model_args, add_offload_args, async_scheduling, engine_from_args
from expertyard.entrypoints.disagg_cmd import decode_graphs, disagg_config, run_distributed
from expertyard.entrypoints.disagg_flags import add_disagg_args
from expertyard.errors import ConfigError, DeploymentDownError
from expertyard.loader.hub import is_hub_id


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p, synthetic=True)
    add_offload_args(p)
    add_disagg_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to the network")
    g.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    g.add_argument("--api-key", default=os.environ.get("EXPERTYARD_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $EXPERTYARD_API_KEY, else none)")
    g.add_argument("--served-model-name", default=None,
                   help="the name clients send as 'model' (default: the model directory's name, the synthetic "
                        "name, or tiny-moe)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens one engine step may compute; longer prompts are prefilled in chunks")
    g.add_argument("--max-request-bytes", type=int, default=16 * 2**20, help="larger bodies get 413")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, seconds to let in-flight requests finish before aborting them")
    g.add_argument("--warmup", choices=["auto", "on", "off"], default="auto",
                   help="before serving, run prompts of every size a step can hold, so that kernel compiles happen "
                        "at start-up and not under load (auto: on CUDA only)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="info: one access line per request (method, path, status, tokens, latency)")
    p.set_defaults(func=run, max_num_seqs=32)


def served_name(args) -> str:
    if args.served_model_name:
        return args.served_model_name
    if getattr(args, "synthetic", None):
        return args.synthetic
    if args.model is not None and not args.model.exists() and is_hub_id(str(args.model)):
        return str(args.model)  # a hub id is served under its own name, as vLLM does
    return args.model.resolve().name if args.model else "tiny-moe"


def warm_up_if_asked(engine, args) -> None:
    """`--warmup on`, or `auto` on a GPU: run the step shapes and compositions a loaded server meets before it
    listens (server/warmup.py)."""
    if args.warmup == "on" or (args.warmup == "auto" and engine.device.type == "cuda"):
        from expertyard.server.warmup import warm_up

        print(f"expertyard serve: warm-up took {warm_up(engine):.1f} s", file=sys.stderr, flush=True)
        if hasattr(engine.model.experts, "reset_stats") and getattr(engine.model.experts, "state", None):
            engine.model.experts.reset_stats()  # the expert cache metrics start at the first request
        from expertyard.engine.collector import freeze_long_lived

        freeze_long_lived()  # the captured graphs and their buffers live as long as the server


def run(args) -> int:
    try:
        import uvicorn

        from expertyard.server import build_app
    except ImportError as e:
        raise ConfigError(f"the server needs its extra dependencies ({e.name} is missing): "
                          "pip install 'expertyard[serve]'") from None
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port {args.port} must be in 0..65535")
    if args.max_request_bytes < 1024:
        raise ConfigError(f"--max-request-bytes {args.max_request_bytes} must be >= 1024")
    if args.disaggregate:  # several ranks through torchrun's launcher; the server runs on attention rank 0
        return serve_distributed(args)
    from expertyard.server.app import configure_logging

    configure_logging(args.log_level)  # the access lines at info
    engine = engine_from_args(args, max_num_batched_tokens=args.max_num_batched_tokens)
    warm_up_if_asked(engine, args)
    app = build_app(engine, served_name(args), api_key=args.api_key or None, max_body_bytes=args.max_request_bytes)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout, access_log=args.log_level == "debug")
    # uvicorn catches SIGTERM/SIGINT (stop accepting, finish in-flight requests, then the lifespan stops the
    # engine) and re-raises the signal once done: a no-op handler makes that clean stop exit with status 0
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.Server(config).run()
    return 0


# ---- serve --disaggregate ------------------------------------------------------------------------------

def serve_job(engine, args) -> int:
    """Rank 0: the OpenAI-compatible server around the distributed engine (returns when it stops)."""
    import uvicorn

    from expertyard.server import build_app

    warm_up_if_asked(engine, args)  # on GPUs this also captures the attention ranks' decode graphs
    app = build_app(engine, served_name(args), api_key=args.api_key or None, max_body_bytes=args.max_request_bytes)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout, access_log=args.log_level == "debug")
    print(f"expertyard serve: {disagg_config(args).mode} deployment ready on http://{args.host}:{args.port}",
          file=sys.stderr, flush=True)
    uvicorn.Server(config).run()
    # stopped by a signal: the launcher's agent stops the other ranks too, so waiting for them to take a
    # "stop" header (or for a dead one to time out) would only delay the exit
    exit_now(0)


def serve_distributed(args) -> int:
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                          max_num_batched_tokens=args.max_num_batched_tokens, cuda_graphs=decode_graphs(args),
                          async_scheduling=async_scheduling(args)[0])
    try:
        run_distributed(args, config, functools.partial(serve_job, args=args), args.max_restarts)
    except DeploymentDownError as e:
        if "RANK" in os.environ:  # under torchrun: the agent reports it
            raise
        print(f"expertyard serve: {e}; answering 503 on port {args.port} until stopped", file=sys.stderr, flush=True)
        serve_down(args, str(e))
        return 1
    return 0


def serve_down(args, reason: str) -> None:
    """After the deployment went down for good: every request gets 503 with the reason (load balancers and
    clients see an answer, not a refused connection), until SIGTERM/SIGINT."""
    import uvicorn

    body = json.dumps({"error": {"message": f"the deployment is down: {reason}", "type": "server_error",
                                 "param": None, "code": "deployment_down"}}).encode()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # uvicorn re-raises it after its clean stop
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (torchrun's launcher had replaced both)
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", lifespan="off")).run()
