"""Load test for `jaxgpt serve`: N concurrent streaming completions under each batching mode, in one run.

Modes: `continuous` (rows join and leave the running decode between chunks), `dynamic` (a batch runs to
its end) and `off` (one request at a time). For each mode a server is started as a subprocess on
127.0.0.1 (a free port), warmed up (bursts at every batch size and power-of-two length compile the shapes
each mode uses), then --requests streaming /v1/completions requests are sent at once (httpx, asyncio),
request i asking for max_tokens drawn uniformly from --min-tokens..--max-tokens (one seeded draw, the same
for every mode; sampled, one seed per request). Every request must end with `data: [DONE]` and no error
event. Reported per mode: requests/s and completion tokens/s (over the wall time of the whole burst),
p50/p99 latency (request sent -> [DONE]) and p50/p99 time to the first text chunk, and ratios against
the first mode. The burst is bounded by --timeout seconds per mode; the server gets SIGTERM at the end.

`--single N`: instead, one request at a time, N times after two warm-ups (the same prompt, --max-tokens
tokens, one seed): median latency and time to the first text chunk per mode, and ratios against the first
mode; what an idle server's only user sees.

`--conversation`: instead, time to first token of each turn of --conversations chat conversations of
--turns turns (sequential, greedy, --reply-tokens per reply; each turn sends the whole conversation so
far), with the server's prefix cache on (the default) and off (`--prefix-cache-mb 0`), and the ratio at
the last turn.

Run:
  python scripts/bench_serve.py --run-dir runs/shakespeare
  python scripts/bench_serve.py --run-dir runs/shakespeare --conversation
  python scripts/bench_serve.py --run-dir runs/shakespeare --single 10 --modes continuous,dynamic
  python scripts/bench_serve.py --run-dir runs/shakespeare --modes continuous,dynamic --json-out serve.json
Prints a table, then one line `JSON {...}` (also written to --json-out FILE).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

PROMPTS = ["ROMEO:", "JULIET:", "First Citizen:", "KING HENRY:", "To be, or not", "HAMLET:", "Now is the winter",
           "O, what a", "MACBETH:", "Good morrow,", "LEAR:", "What light"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> dict:
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8, "seed": i,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens, done, error = None, 0, False, None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]["message"]
            elif chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - t0
    latency = time.perf_counter() - t0
    if error or not done:
        return {"error": error or "stream ended without [DONE]"}
    return {"latency": latency, "ttft": first if first is not None else latency, "tokens": tokens}


async def burst(url: str, max_tokens: list[int], offset: int = 0) -> tuple[list[dict], float]:
    """One request per entry of max_tokens, all sent at once."""
    n = len(max_tokens)
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, offset + i, m) for i, m in enumerate(max_tokens)))
        return list(results), time.perf_counter() - t0


def start_server(run_dir: str, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jaxgpt.cli", "serve", "--run-dir", run_dir, "--host", "127.0.0.1",
           "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not come up within 180 s")


def summary(mode: str, results: list[dict], wall: float, health: dict) -> dict:
    errors = [r["error"] for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    lat, ttft = np.array([r["latency"] for r in ok]), np.array([r["ttft"] for r in ok])
    tokens = sum(r["tokens"] for r in ok)
    pct = lambda a, q: float(np.percentile(a, q)) if len(a) else None  # noqa: E731
    return {"mode": mode, "requests": len(results), "errors": len(errors), "first_errors": errors[:3],
            "wall_s": wall, "requests_per_s": len(ok) / wall, "tokens_per_s": tokens / wall, "tokens": tokens,
            "latency_p50_s": pct(lat, 50), "latency_p99_s": pct(lat, 99), "ttft_p50_s": pct(ttft, 50),
            "ttft_p99_s": pct(ttft, 99), "server_batches": health.get("batches"),
            "server_largest_batch": health.get("largest_batch")}


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


async def chat_turn(client: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed greedy chat turn: its reply, time to first text and prompt tokens."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, first, reply, prompt_tokens = time.perf_counter(), None, "", None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"]["prompt_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter() - t0
                reply += chunk["choices"][0]["delta"]["content"]
    return {"reply": reply, "ttft": first or time.perf_counter() - t0, "prompt_tokens": prompt_tokens}


async def conversations(url: str, n: int, turns: int, reply_tokens: int, offset: int) -> list[list[dict]]:
    out = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        for c in range(n):
            messages, timings = [], []
            for t in range(turns):
                messages.append({"role": "user", "content": f"{PROMPTS[(offset + c + t) % len(PROMPTS)]} Say more."})
                turn = await chat_turn(client, url, messages, reply_tokens)
                messages.append({"role": "assistant", "content": turn["reply"]})
                timings.append(turn)
            out.append(timings)
    return out


def run_conversation(args) -> None:
    rows = []
    for cache_mb in (None, 0):
        port = free_port()
        extra = ["--max-batch", str(args.max_batch)] + ([] if cache_mb is None else ["--prefix-cache-mb", "0"])
        proc = start_server(args.run_dir, port, extra)
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(conversations(url, 2, args.turns, args.reply_tokens, offset=100))  # compile the shapes
            runs = asyncio.run(conversations(url, args.conversations, args.turns, args.reply_tokens, offset=0))
        finally:
            stop_server(proc)
        ttft = [float(np.median([run[t]["ttft"] for run in runs])) for t in range(args.turns)]
        prompt = [int(np.median([run[t]["prompt_tokens"] for run in runs])) for t in range(args.turns)]
        rows.append({"prefix_cache": cache_mb is None, "ttft_median_s_by_turn": ttft, "prompt_tokens_by_turn": prompt})
    on, off = rows
    print(f"{args.conversations} chat conversations x {args.turns} turns, {args.reply_tokens} greedy reply tokens, "
          f"run dir {args.run_dir}, cpu count {os.cpu_count()}: median time to first token (ms)")
    print(f"{'turn':>4} {'prompt tokens':>13} {'prefix cache':>12} {'no cache':>9} {'ratio':>6}")
    for t in range(args.turns):
        print(f"{t + 1:>4} {on['prompt_tokens_by_turn'][t]:>13} {on['ttft_median_s_by_turn'][t] * 1e3:>12.1f} "
              f"{off['ttft_median_s_by_turn'][t] * 1e3:>9.1f} "
              f"{off['ttft_median_s_by_turn'][t] / on['ttft_median_s_by_turn'][t]:>5.2f}x")
    line = json.dumps({"conversations": args.conversations, "turns": args.turns, "reply_tokens": args.reply_tokens,
                       "last_turn_speedup": off["ttft_median_s_by_turn"][-1] / on["ttft_median_s_by_turn"][-1],
                       "modes": rows})
    print("JSON " + line)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")


def run_mode(args, mode: str, max_tokens: list[int]) -> dict:
    port = free_port()
    extra = ["--max-batch", str(args.max_batch), "--batching", mode]
    if args.quantize:
        extra += ["--quantize", args.quantize]
    proc = start_server(args.run_dir, port, extra)
    url = f"http://127.0.0.1:{port}"
    try:
        lengths = sorted({min(max(16, 1 << (m - 1).bit_length()), args.max_tokens) for m in max_tokens})
        sizes = [1] if mode == "off" else sorted({1, 2, 4, args.max_batch})
        for size in sizes:  # compile every (rows, length) shape the burst can meet
            for length in lengths:
                asyncio.run(burst(url, [length] * size, offset=1000))
        results, wall = asyncio.run(asyncio.wait_for(burst(url, max_tokens), args.timeout))
        health = httpx.get(f"{url}/health").json()
    finally:
        stop_server(proc)
    return summary(mode, results, wall, health)


async def one_at_a_time(url: str, n: int, max_tokens: int) -> list[dict]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        return [await one_request(client, url, 0, max_tokens) for _ in range(n)]


def run_single(args, mode: str) -> dict:
    port = free_port()
    proc = start_server(args.run_dir, port, ["--max-batch", str(args.max_batch), "--batching", mode])
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(one_at_a_time(url, 2, args.max_tokens))  # compile its shapes, then a warm request
        results = asyncio.run(one_at_a_time(url, args.single, args.max_tokens))
    finally:
        stop_server(proc)
    if errors := [r["error"] for r in results if "error" in r]:
        raise RuntimeError(f"{mode}: {errors[0]}")
    return {"mode": mode, "latency_median_s": float(np.median([r["latency"] for r in results])),
            "ttft_median_s": float(np.median([r["ttft"] for r in results])), "tokens": results[0]["tokens"]}


def single_table(args, modes: list[str]) -> None:
    rows = [run_single(args, m) for m in modes]
    base = rows[0]
    print(f"one request at a time, {args.single} runs, max_tokens {args.max_tokens}, max batch {args.max_batch}, "
          f"run dir {args.run_dir}, cpu count {os.cpu_count()}")
    print(f"{'mode':11} {'tokens':>6} {'latency':>8} {'vs ' + base['mode']:>14} {'ttft':>8} {'vs ' + base['mode']:>14}")
    for r in rows:
        r["latency_ratio"] = r["latency_median_s"] / base["latency_median_s"]
        r["ttft_ratio"] = r["ttft_median_s"] / base["ttft_median_s"]
        print(f"{r['mode']:11} {r['tokens']:>6} {r['latency_median_s']:>7.3f}s {r['latency_ratio']:>13.2f}x "
              f"{r['ttft_median_s']:>7.3f}s {r['ttft_ratio']:>13.2f}x")
    line = json.dumps({"single": args.single, "max_tokens": args.max_tokens, "max_batch": args.max_batch,
                       "modes": rows})
    print("JSON " + line)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")


def print_table(title: str, rows: list[dict]) -> None:
    print(title)
    print(f"{'mode':11} {'errors':>6} {'req/s':>7} {'tok/s':>8} {'p50 lat':>8} {'p99 lat':>8} {'p50 ttft':>9} "
          f"{'p99 ttft':>9} {'tok/s vs ' + rows[0]['mode']:>20} {'batches':>8} {'largest':>8}")
    fmt = lambda v: f"{v:.2f}s" if v is not None else "-"  # noqa: E731
    for r in rows:
        ratio = r["tokens_per_s"] / rows[0]["tokens_per_s"] if rows[0]["tokens_per_s"] else float("nan")
        print(f"{r['mode']:11} {r['errors']:>6} {r['requests_per_s']:>7.2f} {r['tokens_per_s']:>8.1f} "
              f"{fmt(r['latency_p50_s']):>8} {fmt(r['latency_p99_s']):>8} {fmt(r['ttft_p50_s']):>9} "
              f"{fmt(r['ttft_p99_s']):>9} {ratio:>19.2f}x {r['server_batches']:>8} {r['server_largest_batch']:>8}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--min-tokens", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--quantize", choices=("int8",))
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed for the measured burst, per mode")
    ap.add_argument("--modes", default="continuous,dynamic,off", help="batching modes, the first is the baseline")
    ap.add_argument("--conversation", action="store_true", help="time to first token per chat turn, prefix "
                    "cache on vs off, instead of the burst")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--reply-tokens", type=int, default=48)
    ap.add_argument("--single", type=int, default=0, help="time this many one-at-a-time requests instead")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    if args.conversation:
        return run_conversation(args)
    if not 1 <= args.requests <= 512:
        ap.error("--requests must be in [1, 512]")
    if not 1 <= args.min_tokens <= args.max_tokens:
        ap.error("--min-tokens must be in [1, --max-tokens]")
    modes = [m.strip() for m in args.modes.split(",")]
    if bad := [m for m in modes if m not in ("continuous", "dynamic", "off")]:
        ap.error(f"--modes takes continuous, dynamic and off; got {', '.join(bad)}")
    if args.single > 0:
        return single_table(args, modes)
    max_tokens = np.random.default_rng(0).integers(args.min_tokens, args.max_tokens + 1, args.requests).tolist()
    rows = [run_mode(args, m, max_tokens) for m in modes]

    print_table(f"{args.requests} concurrent streaming requests, max_tokens uniform in {args.min_tokens}.."
                f"{args.max_tokens} (sum {sum(max_tokens)}), max batch {args.max_batch}, run dir {args.run_dir}, "
                f"cpu count {os.cpu_count()}", rows)
    line = json.dumps({"requests": args.requests, "min_tokens": args.min_tokens, "max_tokens": args.max_tokens,
                       "max_batch": args.max_batch, "quantize": args.quantize, "modes": rows})
    print("JSON " + line)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    if any(r["errors"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
