"""moerge on Ray Serve against the single-process server: the ingress's cost, and how often a request finds its
experts warm.

Starts ``moerge serve`` (one process) and ``moerge serve --ray --replicas N`` (an ingress and N model replicas on a
local Ray cluster) on the same library (default: the zoo on SmolLM2-135M-Instruct, ``make demo`` builds it), one
after the other, and sends each the same sequence of 2-token chat requests (the library's experts' example prompts,
in turn, one at a time). Printed:

1. the median latency of each and their ratio (target: the ingress ≤ 1.3× the single-process server);
2. for the Ray server, the share of requests served by the replica that served the previous request of the same
   routing key (the retrieved experts, ``x-moerge-route``; the replica, ``x-moerge-replica``), after each key's first
   request (target ≥ 95%), and how the keys spread over the replicas;
3. for the Ray server, where each request's global stage ran: once, in the ingress, whose ranking the replica's
   router took (``x-moerge-global-stage: ingress``), or again in the replica (``replica``).

Every figure is measured in one run, on this machine (the replicas share its CPUs with the ingress and the client).

    python benchmarks/ray_serving.py                       # the zoo library, 2 replicas
    python benchmarks/ray_serving.py --library L --replicas 3 --requests 120
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict

import httpx


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(client: httpx.Client, server: subprocess.Popen, seconds: float = 900) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if client.get("/v1/models").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start:\n{server.stderr.read()[-3000:]}")
        time.sleep(1.0)


def _prompts(library: str) -> list[tuple[str, str]]:
    """``(expert, prompt)``: each expert's example prompts, interleaved over the experts."""
    from moerge.library import ExpertLibrary

    lib = ExpertLibrary.open(library)
    per = {n: list(lib.stored(n).metadata.examples) for n in lib.names()}
    out = []
    for i in range(max((len(v) for v in per.values()), default=0)):
        out += [(n, v[i]) for n, v in per.items() if i < len(v)]
    return out


def _run(cmd: list[str], port: int, prompts: list[tuple[str, str]], n: int) -> list[tuple[str, float, str, str]]:
    """``(expert, latency, replica, global stage)`` of ``n`` 2-token requests, one at a time, after a warm-up over
    every expert."""
    print("command:", " ".join(cmd), flush=True)
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            _wait(client, server)
            out = []
            for i in range(len(prompts) + n):
                expert, prompt = prompts[i % len(prompts)]
                t = time.perf_counter()
                r = client.post("/v1/chat/completions", json={
                    "model": "moerge", "messages": [{"role": "user", "content": prompt}], "max_tokens": 2,
                    "temperature": 0})
                r.raise_for_status()
                if i >= len(prompts):  # the first pass reads every expert in: a warm-up
                    key = r.headers.get("x-moerge-route", expert)  # the experts the ingress placed it by
                    out.append((key, time.perf_counter() - t, r.headers.get("x-moerge-replica", "-"),
                                r.headers.get("x-moerge-global-stage", "-")))
            return out
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", default="zoo/library")
    ap.add_argument("--router", default="glider")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs (torch threads) of each replica")
    ap.add_argument("--requests", type=int, default=60)
    args = ap.parse_args()
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    prompts = _prompts(args.library)
    base = [sys.executable, "-m", "moerge.cli", "serve", "-l", args.library, "--router", args.router]
    port = _port()
    single = _run(base + ["--port", str(port)], port, prompts, args.requests)
    port = _port()
    env_cmd = base + ["--port", str(port), "--ray", "--replicas", str(args.replicas), "--replica-cpus",
                      str(args.replica_cpus)]
    try:
        ray = _run(env_cmd, port, prompts, args.requests)
    finally:  # the local Ray cluster the server started (the ray command of this Python's environment)
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        if os.path.exists(ray_cli):
            subprocess.run([ray_cli, "stop", "--force"], capture_output=True)
    a, b = statistics.median(t for _, t, _, _ in single), statistics.median(t for _, t, _, _ in ray)
    print(f"\n1. {args.requests} requests of 2 tokens, one at a time (after a warm-up over every expert)")
    print(f"   single process: median {a * 1000:7.1f} ms")
    print(f"   ray ingress:    median {b * 1000:7.1f} ms   ratio {b / a:.2f}x (target <= 1.3x)")
    last: dict[str, str] = {}
    warm = total = 0
    spread: dict[str, Counter] = defaultdict(Counter)
    for expert, _, replica, _ in ray:
        if expert in last:
            total += 1
            warm += replica == last[expert]
        last[expert] = replica
        spread[replica][expert] += 1
    print(f"\n2. requests on the replica of their key's previous request: {warm}/{total} "
          f"= {100 * warm / max(total, 1):.1f}% (target >= 95%)")
    for replica, experts in sorted(spread.items()):
        print(f"   replica {replica}: {dict(experts)}")
    stages = Counter(stage for _, _, _, stage in ray)
    print(f"\n3. where the global stage ran (x-moerge-global-stage): {dict(stages)}")


if __name__ == "__main__":
    main()
