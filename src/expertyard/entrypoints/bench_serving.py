"""`expertyard bench serving`: drive a running server with N concurrent streaming clients; report throughput,
time to first token (TTFT), time per output token after the first (TPOT) and end-to-end latency percentiles."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

from expertyard.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("bench-serving", help="benchmark a running `expertyard serve` (also: `expertyard bench "
                                             "serving`)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated numbers of concurrent clients")
    p.add_argument("--num-requests", type=int, default=None, help="requests per level (default: 4 x concurrency, >= 8)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (random ids), unless --prompt")
    p.add_argument("--prompt", default=None, help="send this text as the prompt instead of random token ids")
    p.add_argument("--output-len", type=int, default=128, help="tokens generated per request (EOS ignored)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of every request")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts and of each request's sampling")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise ConfigError("bench serving needs httpx: pip install 'expertyard[serve]'") from None
    levels = [int(c) for c in args.concurrency.split(",")]
    if any(c < 1 for c in levels) or args.output_len < 1 or args.input_len < 1:
        raise ConfigError("--concurrency, --output-len and --input-len must be >= 1")
    results = asyncio.run(_bench(args, levels))
    if args.json:
        print(json.dumps({"url": args.url, "input_len": args.input_len, "output_len": args.output_len,
                          "levels": results}))
    return 0


async def _bench(args, levels: list[int]) -> list[dict]:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=max(levels) + 1, max_keepalive_connections=max(levels) + 1)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=600, limits=limits) as client:
        r = await client.get("/v1/models")
        if r.status_code != 200:
            raise ConfigError(f"{args.url}/v1/models answered {r.status_code}: {r.text[:200]}")
        model = args.model or r.json()["data"][0]["id"]

        def body() -> dict:
            prompt = args.prompt or [rng.randrange(10, 1000) for _ in range(args.input_len)]
            return {"model": model, "prompt": prompt, "max_tokens": args.output_len, "temperature": args.temperature,
                    "stream": True, "ignore_eos": True, "return_token_ids": True, "seed": rng.randrange(2**31)}

        await one_request(client, body())  # warm-up (first-call allocations, CUDA graphs)
        out = []
        for c in levels:
            n = args.num_requests or max(4 * c, 8)
            bodies = [body() for _ in range(n)]
            queue = iter(bodies)
            records: list[dict] = []

            async def worker():
                for b in queue:
                    records.append(await one_request(client, b))

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(c)))
            out.append(summarize(c, records, time.perf_counter() - t0))
            if not args.json:  # each level as soon as it is measured
                print(format_table(out[-1:], header=len(out) == 1), flush=True)
        return out


async def one_request(client, body: dict) -> dict:
    """Stream one completion; times of the first chunk with tokens and of the last."""
    t0 = time.perf_counter()
    first, tokens, error = None, 0, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]["message"]
                break
            got = sum(len(c.get("token_ids") or []) for c in chunk["choices"])
            if got and first is None:
                first = time.perf_counter()
            tokens += got
    end = time.perf_counter()
    return {"ttft": (first or end) - t0, "latency": end - t0, "tokens": tokens, "error": error}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summarize(concurrency: int, records: list[dict], seconds: float) -> dict:
    ok = [r for r in records if not r.get("error")]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok]
    tpot = [(r["latency"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    e2e = [r["latency"] for r in ok]
    out = {"concurrency": concurrency, "requests": len(records), "errors": len(records) - len(ok),
           "seconds": round(seconds, 3), "requests_per_s": round(len(ok) / seconds, 3),
           "output_tokens_per_s": round(tokens / seconds, 2)}
    for name, values in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}_ms"] = round(1e3 * percentile(values, q), 2)
    return out


def format_table(results: list[dict], header: bool = True) -> str:
    cols = ["concurrency", "requests", "errors", "output_tokens_per_s", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms",
            "tpot_p50_ms", "tpot_p90_ms", "tpot_p99_ms", "e2e_p50_ms"]
    names = ["conc", "reqs", "err", "out tok/s", "TTFT p50", "p90", "p99", "TPOT p50", "p90", "p99", "E2E p50"]
    lines = [" ".join(f"{n:>10}" for n in names)] if header else []
    lines += [" ".join(f"{r[c]:>10}" for c in cols) for r in results]
    return "\n".join(lines)
