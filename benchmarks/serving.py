"""The server under concurrent requests: do short requests wait behind a long one, and does batching pay?

Starts ``moerge serve`` on a library (default: the zoo on SmolLM2-135M-Instruct, ``make demo`` builds it) in a child
process, then measures over HTTP (httpx, one thread per client):

1. **Head-of-line blocking.** Three 2-token requests sent together with nothing else running (the reference), then
   the same three sent together while a 150-token request is decoding (streamed, its end tokens banned with
   ``logit_bias``; sent after its fifth piece, and the stream closed once they are answered). Rounds alternate the
   two; printed: each one's median latency over its median alone (target ≤ 2×).
2. **Throughput.** 16 requests (different prompts, 32 tokens each, greedy, end tokens banned: equal work) sent one
   at a time, then all 16 at once. Printed: tokens per second of each, and their ratio (target ≥ 2×).

Every figure is a ratio against a reference measured in the same run, on the same machine.

    python benchmarks/serving.py                       # the zoo library (zoo/library), glider
    python benchmarks/serving.py --library L --router arrow --max-batch 16
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
from concurrent.futures import ThreadPoolExecutor

import httpx

PROMPTS = [
    "Rank these values, lowest first.\n\n59, 5, 71, 60, 85, 50", "Translate to French: the cat is black.",
    "What is 17 times 23?", "Write a SQL query: customers from Paris.", "Summarize: the meeting moved to Friday.",
    "Uppercase this: quiet morning light", "Reverse the words: red green blue", "Spell out 42 in words.",
    "Give the JSON for a person named Ana, 31.", "Which is larger, 0.3 or 0.25?", "Sort: pear fig apple",
    "Name three primary colors.", "Count the vowels in 'banana'.", "Translate to French: good night",
    "What is 9 squared?", "Write a SQL query: orders over 100 dollars.",
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ask(client: httpx.Client, prompt: str, max_tokens: int, ban: dict[str, int]) -> tuple[float, int]:
    """One chat completion (``ban``: its logit bias); its latency and completion tokens."""
    t = time.perf_counter()
    r = client.post("/v1/chat/completions", json={
        "model": "moerge", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0, "logit_bias": ban})
    r.raise_for_status()
    return time.perf_counter() - t, r.json()["usage"]["completion_tokens"]


def _end_tokens() -> list[int]:
    """The default base's end-of-text ids (the zoo's base): banned to make the long request run to its length."""
    from moerge.lab.defaults import default_tokenizer

    tok = default_tokenizer()
    return sorted({tok.eos_token_id, tok.pad_token_id, *tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])}
                  - {None, tok.unk_token_id})


def _behind_long(client: httpx.Client, pool: ThreadPoolExecutor, shorts: list[str], tokens: int,
                 ban: dict[str, int]) -> tuple[list[float], int]:
    """The latencies of ``shorts`` sent together once a streamed ``tokens``-token request has sent 5 pieces (the
    stream is then closed: the server drops the long request); and the piece they were sent after."""
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "moerge", "messages": [{"role": "user", "content": PROMPTS[0]}], "temperature": 0,
            "max_tokens": tokens, "logit_bias": ban, "stream": True}) as stream:
        pieces = 0
        for line in stream.iter_lines():
            pieces += line.startswith("data: {")
            if pieces == 5:
                return [f.result()[0] for f in [pool.submit(_ask, client, p, 2, ban) for p in shorts]], pieces
    raise RuntimeError("the long request ended before its fifth piece")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", default="zoo/library")
    ap.add_argument("--router", default="glider")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--long", type=int, default=150, help="tokens of the long request")
    ap.add_argument("--tokens", type=int, default=32, help="tokens of each throughput request")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the head-of-line measurement")
    args = ap.parse_args()
    port = _port()
    cmd = [sys.executable, "-m", "moerge.cli", "serve", "-l", args.library, "--router", args.router, "--port", str(port),
           "--max-batch", str(args.max_batch)]
    print("command:", " ".join(cmd))
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            deadline = time.monotonic() + 600
            while True:
                try:
                    client.get("/v1/models").raise_for_status()
                    break
                except httpx.TransportError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"the server did not start:\n{server.stderr.read()[-3000:]}") from None
                    time.sleep(0.5)
            ban = {str(t): -100 for t in _end_tokens()}
            _ask(client, PROMPTS[0], 4, ban)  # warm up

            # 1. head-of-line blocking (rounds alternate, so the machine's drift hits both sides alike)
            shorts = PROMPTS[1:4]
            refs, behinds, long_pieces = [], [], []
            with ThreadPoolExecutor(4) as pool:
                for _ in range(args.rounds):
                    refs.append([f.result()[0] for f in [pool.submit(_ask, client, p, 2, ban) for p in shorts]])
                    behind, pieces = _behind_long(client, pool, shorts, args.long, ban)
                    behinds.append(behind)
                    long_pieces.append(pieces)
            print(f"\n1. three 2-token requests sent together, alone and while a {args.long}-token request decodes "
                  f"(sent after its piece {long_pieces[0]}; {args.rounds} rounds, medians)")
            worst = 0.0
            for i, p in enumerate(shorts):
                a, b = (statistics.median(r[i] for r in runs) for runs in (refs, behinds))
                worst = max(worst, b / a)
                print(f"   {p[:40]!r:44} alone {a * 1000:7.1f} ms   behind {b * 1000:7.1f} ms   {b / a:5.2f}x")
            print(f"   worst: {worst:.2f}x (target <= 2x)")

            # 2. throughput
            t = time.perf_counter()
            seq = [_ask(client, p, args.tokens, ban) for p in PROMPTS]
            seq_s = time.perf_counter() - t
            with ThreadPoolExecutor(len(PROMPTS)) as pool:
                t = time.perf_counter()
                conc = list(pool.map(lambda p: _ask(client, p, args.tokens, ban), PROMPTS))
                conc_s = time.perf_counter() - t
            seq_tok, conc_tok = sum(n for _, n in seq), sum(n for _, n in conc)
            print(f"\n2. {len(PROMPTS)} requests of {args.tokens} tokens")
            print(f"   one at a time: {seq_s:6.2f} s, {seq_tok} tokens, {seq_tok / seq_s:7.1f} tokens/s")
            print(f"   all at once:   {conc_s:6.2f} s, {conc_tok} tokens, {conc_tok / conc_s:7.1f} tokens/s "
                  f"(median latency {statistics.median(s for s, _ in conc):.2f} s)")
            print(f"   throughput ratio: {(conc_tok / conc_s) / (seq_tok / seq_s):.2f}x (target >= 2x)")
            stats = client.get("/v1/moerge/stats").json()["batches"]
            print(f"   rows per decode step: max {max(stats)}, mean {statistics.mean(stats):.1f}")
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
