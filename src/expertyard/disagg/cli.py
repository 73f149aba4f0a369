"""Flags and glue for `expertyard serve --disaggregate` and `expertyard bench --disaggregate`.

On one host the command starts every rank through torchrun's launcher (launch.launch_local). Under `torchrun`
(several hosts: `torchrun ... -m expertyard.disagg.launch serve --disaggregate ...`) each process is already a
rank, and runs its share directly.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

from expertyard.disagg.config import DisaggConfig
from expertyard.disagg.launch import exit_now, launch_local, rank_main
from expertyard.disagg.worker import EngineSettings, ModelSource
from expertyard.entrypoints.common import async_scheduling
from expertyard.errors import ConfigError, DeploymentDownError


def micro_batch_list(args) -> list[int]:
    try:
        ms = [int(m) for m in str(args.micro_batches).split(",")]
    except ValueError:
        raise ConfigError(f"--micro-batches {args.micro_batches!r}: give integers in 1..4, comma-separated") from None
    for m in ms:
        DisaggConfig(micro_batches=m)  # validates
    return ms


def disagg_config(args) -> DisaggConfig:
    ms = micro_batch_list(args)
    if args.mode == "colocated":
        return DisaggConfig.colocated(args.attention_ranks + args.expert_ranks, micro_batches=ms[0],
                                      dist_timeout=args.dist_timeout)
    return DisaggConfig(attention_ranks=args.attention_ranks, expert_ranks=args.expert_ranks, micro_batches=ms[0],
                        dist_timeout=args.dist_timeout)


def parse_replicate(text: str) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for part in filter(None, text.split(";")):
        try:
            layer, experts = part.split(":")
            out[int(layer)] = [int(e) for e in experts.split(",") if e]
        except ValueError:
            raise ConfigError(f"--replicate-experts {text!r}: expected LAYER:E,E;LAYER:E") from None
    return out


def model_source(args) -> ModelSource:
    if getattr(args, "synthetic", None):
        from expertyard.synthetic import synthetic_hf_config

        return ModelSource(hf_config=synthetic_hf_config(args.synthetic, args.num_layers), name=args.synthetic)
    from expertyard.entrypoints.common import bundled_model_path

    path = args.model or bundled_model_path()
    return ModelSource(model_dir=path, name=path.name)


def device_and_dtype(args) -> tuple[str, torch.dtype]:
    from expertyard.entrypoints.common import DTYPES

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    if getattr(args, "offload", False):
        raise ConfigError("--offload and --disaggregate do not combine yet")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if kind == "cuda" else torch.float32)
    return kind, dtype


def run_distributed(args, settings: EngineSettings, job, max_restarts: int = 0) -> object:
    """Start (or, under torchrun, join) the deployment; returns rank 0's job result on the process that has it."""
    cfg = disagg_config(args)
    source, (kind, dtype) = model_source(args), device_and_dtype(args)
    threads = max(1, (os.cpu_count() or 1) // cfg.world_size) if kind == "cpu" else None
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun: this process is one rank
        return rank_main(cfg, source, settings, kind, dtype, job, threads)
    try:
        return launch_local(cfg, source, settings, kind, dtype, job, threads, max_restarts)
    except DeploymentDownError as e:
        raise DeploymentDownError(f"the deployment went down: {e}") from None


# ---- serve --------------------------------------------------------------------------------------------

def serve_job(engine, args) -> int:
    """Rank 0: the OpenAI-compatible server around the distributed engine (returns when it stops)."""
    import uvicorn

    from expertyard.entrypoints.serve_cmd import served_name, warm_up_if_asked
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


def serve(args) -> int:
    settings = EngineSettings(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                              max_num_batched_tokens=args.max_num_batched_tokens,
                              replicate=parse_replicate(args.replicate_experts), decode_graphs=decode_graphs(args),
                              async_scheduling=async_scheduling(args)[0])
    try:
        run_distributed(args, settings, functools.partial(serve_job, args=args), args.max_restarts)
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
    import json

    import uvicorn

    body = json.dumps({"error": {"message": f"the deployment is down: {reason}", "type": "server_error",
                                 "param": None, "code": "deployment_down"}}).encode()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # uvicorn re-raises it after its clean stop
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (torchrun's launcher had replaced both)
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", lifespan="off")).run()


# ---- bench --------------------------------------------------------------------------------------------

def decode_graphs(args) -> bool | None:
    return False if args.eager_decode else None  # None: CUDA graphs wherever the ranks run on CUDA


def bench_job(engine, batch_sizes: list[int], prompt_len: int, decode_tokens: int, ms: list[int], seed: int,
              schedulings: tuple[bool, ...] = (False,)) -> dict[int, list[dict]]:
    from expertyard.disagg.jobs import decode_throughput

    return {b: decode_throughput(engine, b, prompt_len, decode_tokens, ms, seed, schedulings) for b in batch_sizes}


PREFILL_TOKENS_PER_STEP = 16384  # the benchmark's prefill runs in chunks: buffers and activations stay bounded


def bench(args, batch_sizes: list[int]) -> dict:
    ms = micro_batch_list(args)
    cfg = disagg_config(args)
    settings = EngineSettings(max_num_seqs=max(batch_sizes), max_model_len=args.prompt_len + args.decode_tokens + 1,
                              max_num_batched_tokens=min(max(batch_sizes) * args.prompt_len, PREFILL_TOKENS_PER_STEP),
                              replicate=parse_replicate(args.replicate_experts), decode_graphs=decode_graphs(args))
    job = functools.partial(bench_job, batch_sizes=batch_sizes, prompt_len=args.prompt_len,
                            decode_tokens=args.decode_tokens, ms=ms, seed=args.seed,
                            schedulings=tuple(async_scheduling(args, sweep=True)))
    runs = run_distributed(args, settings, job)
    if runs is None:  # a follower rank under torchrun
        exit_now(0)
    kind, dtype = device_and_dtype(args)
    result = {"model": args.synthetic or str(args.model or "bundled"), "num_layers": args.num_layers,
              "mode": cfg.mode, "attention_ranks": cfg.attention_ranks if cfg.mode == "disaggregated" else None,
              "expert_ranks": cfg.expert_ranks if cfg.mode == "disaggregated" else None, "gpus": cfg.world_size,
              "device": kind, "dtype": str(dtype).removeprefix("torch."), "prompt_len": args.prompt_len,
              "decode_tokens": args.decode_tokens, "decode_graphs": kind == "cuda" and not args.eager_decode,
              "runs": []}
    for b, rows in runs.items():
        for r in rows:
            result["runs"].append({"batch": b, **r, "per_gpu_tokens_per_s": r["decode_tokens_per_s"] / cfg.world_size})
    return result


def print_bench_table(r: dict) -> None:
    shape = f"{r['attention_ranks']} attention + {r['expert_ranks']} expert ranks" if r["mode"] == "disaggregated" \
        else f"{r['gpus']} ranks"
    graphs = "decode from CUDA graphs" if r.get("decode_graphs") else "eager decode"
    print(f"{r['model']} ({r['dtype']}, {r['device']}): {r['mode']}, {shape}; prompt {r['prompt_len']}, "
          f"decode {r['decode_tokens']} tokens; {graphs}")
    print(f"{'batch':>5} {'m':>2} {'async':>5} {'decode tok/s':>13} {'tok/s/GPU':>10} {'TPOT ms':>8} "
          f"{'step ms p50':>11} {'max':>7}")
    for row in r["runs"]:
        flag = "on" if row.get("async_scheduling") else "off"
        print(f"{row['batch']:>5} {row['micro_batches']:>2} {flag:>5} {row['decode_tokens_per_s']:13.1f} "
              f"{row['per_gpu_tokens_per_s']:10.1f} {row['tpot_ms']:8.2f} {row.get('step_ms_median', 0):11.2f} "
              f"{row.get('step_ms_max', 0):7.2f}")
