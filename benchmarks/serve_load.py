"""Load test of `krea2 serve` on loopback: 1, 4 and 16 concurrent clients, bounded in requests and time.

Starts `krea2 serve` in a subprocess on a free port (the clients stay out of its process), sends each level's
requests (one image each, distinct prompts and seeds, one shape) from that many concurrent clients, retrying a 429 after
its Retry-After, and reports throughput, p50/p99 latency, the 429s, the deepest queue seen on /metrics and whether
every accepted request was answered. Baselines, the same images in one process: one `Pipeline.generate` call per
request (a server without batching), and one `krea2 generate`-style call with every prompt (offline batching).

    OMP_NUM_THREADS=2 python benchmarks/serve_load.py [--checkpoint world] [--requests 48] [--max-batch 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

PROMPTS = ["a red circle", "a blue square", "a green triangle", "two orange triangles", "a large striped blue circle",
           "a red square above a blue circle", "a small green triangle in the top left", "a yellow circle"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def queue_depth(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("krea2_queue_depth "):
            return float(line.split()[1])
    return 0.0


async def level(url: str, clients: int, requests: int, time_limit: float) -> dict:
    todo = list(range(requests))
    latencies, codes, rejected, deepest = [], {}, 0, 0.0
    deadline = time.perf_counter() + time_limit

    async def client(http: httpx.AsyncClient):
        nonlocal rejected
        while todo and time.perf_counter() < deadline:
            i = todo.pop(0)
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "n": 1}
            t0 = time.perf_counter()
            while True:
                r = await http.post(f"{url}/v1/images/generations", json=body)
                if r.status_code != 429:
                    break
                rejected += 1
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))
            latencies.append(time.perf_counter() - t0)
            codes[r.status_code] = codes.get(r.status_code, 0) + 1

    async def watch():
        nonlocal deepest
        while todo or any(not t.done() for t in tasks):
            deepest = max(deepest, await asyncio.to_thread(queue_depth, url))
            await asyncio.sleep(0.1)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        tasks = [asyncio.create_task(client(http)) for _ in range(clients)]
        watcher = asyncio.create_task(watch())
        await asyncio.gather(*tasks)
        await watcher
    wall = time.perf_counter() - t0
    done = len(latencies)
    return {"clients": clients, "requests": done, "wall_s": round(wall, 2), "images_per_s": round(done / wall, 2),
            "p50_s": round(float(np.percentile(latencies, 50)), 3),
            "p99_s": round(float(np.percentile(latencies, 99)), 3), "codes": codes, "rejected_429": rejected,
            "deepest_queue": deepest, "unanswered": requests - sum(codes.values()) - len(todo)}


def baselines(checkpoint: str, requests: int) -> dict:
    import torch

    from krea2.pipeline import load_pipeline

    pipe = load_pipeline(checkpoint)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    with torch.inference_mode():
        pipe.generate(prompts[:2], seed=0)  # warm-up
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            pipe.generate([p], seed=i)
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipe.generate(prompts, seeds=list(range(requests)))
        batched = time.perf_counter() - t0
    return {"one_call_per_request_images_per_s": round(requests / one, 2),
            "one_batched_call_images_per_s": round(requests / batched, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="world")
    ap.add_argument("--requests", type=int, default=48, help="requests per level")
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument("--time-limit", type=float, default=300, help="seconds per level at most")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "krea2.cli", "serve", "--checkpoint", args.checkpoint, "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue), "--timeout", "600"]
    server = subprocess.Popen(cmd, env=os.environ.copy())
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit("krea2 serve did not come up")
            time.sleep(0.2)
        httpx.post(f"{url}/v1/images/generations", json={"prompt": "warm up"}, timeout=120)
        results = [asyncio.run(level(url, int(c), args.requests, args.time_limit)) for c in args.levels.split(",")]
    finally:
        server.terminate()
        server.wait(timeout=30)
    report = {"threads": os.environ.get("OMP_NUM_THREADS"), "checkpoint": args.checkpoint,
              "max_batch": args.max_batch, "max_queue": args.max_queue, "levels": results,
              "baseline": baselines(args.checkpoint, args.requests)}
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
