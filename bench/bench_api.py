"""api.py under load: new tokens/s and p50/p95 time to first token at 1, 4 and 16 concurrent streaming clients.

    python bench/bench_api.py                     # starts api.py on the embedded small model (fp32), then measures
    python bench/bench_api.py --url http://127.0.0.1:8000 --model chatglm-6b   # a server already running

Each client streams `--max_tokens` tokens (ignore_eos, so every answer has the same length) for `--rounds` requests.
"""

import argparse
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def start_server(dtype):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "api.py"), "--port", str(port), "--dtype", dtype],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("api.py did not start")


def one_stream(url, model, prompt, max_tokens):
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    start, ttft, tokens = time.perf_counter(), None, 0
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            temperature=0, max_tokens=max_tokens, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return ttft if ttft is not None else time.perf_counter() - start, tokens


def measure(url, model, clients, rounds, max_tokens):
    prompts = [f"question {i}: tell me about topic {i}" for i in range(clients * rounds)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: one_stream(url, model, p, max_tokens), prompts))
    elapsed = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    return {"clients": clients, "tokens_per_s": sum(r[1] for r in results) / elapsed,
            "ttft_p50_s": statistics.median(ttfts), "ttft_p95_s": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="a running server (default: start api.py on the embedded model)")
    parser.add_argument("--model", default=None, help="model name (default: the server's first)")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client")
    parser.add_argument("--max_tokens", type=int, default=64)
    args = parser.parse_args()
    proc, url = (None, args.url) if args.url else start_server(args.dtype)
    try:
        model = args.model or httpx.get(url + "/v1/models").json()["data"][0]["id"]
        one_stream(url, model, "warm up", 4)
        print(f"{'clients':>8} {'tokens/s':>10} {'TTFT p50 s':>11} {'TTFT p95 s':>11}")
        for n in map(int, args.clients.split(",")):
            r = measure(url, model, n, args.rounds, args.max_tokens)
            print(f"{n:>8} {r['tokens_per_s']:>10.1f} {r['ttft_p50_s']:>11.3f} {r['ttft_p95_s']:>11.3f}", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
