"""Load on a local OpenAI-compatible server: N clients x M requests, batching on and off, beside `transformers serve`.

    python benchmarks/serve_load.py MODEL_DIR --clients 1,2,4,8 --requests 2 --max-tokens 32 \\
        --dtype fp32 --transformers --json serve_load.json

Each configuration starts its server as a subprocess on a free localhost port, waits for /health,
then runs every client count: N threads, each sending M streamed chat requests one after another
(greedy, `max_tokens` tokens, prompts from assets/prompts/distill.jsonl, each row its own so no
request repeats an earlier one), and stops the server. Per client count: total completion tokens / wall time, p50/p95 time to first token (the
first non-empty text chunk) and request latency. Configurations:
- `nbdiff serve --max-batch 8` (batching on) and `--max-batch 1` (one request at a time), block size 1
  (packed lanes: nbdiff.serve.packed); with `--ablation` also batching on with `--prefix-cache 0`
  and batching on with torch's own matrix products instead of nbdiff.cpu_kernel;
- `transformers serve --continuous-batching` on the same folder (`--transformers`), if installed.
Every reply is compared with the same prompt's reply with batching off, where each request runs
alone ("same" counts the equal ones). Each row with N > 1 clients is also served one at a time by a
fresh server of the same configuration: one client sends the same N x M requests in turn, rows in
the same order, so both servers' prefix caches saw the same prompts ("one at a time" tokens/s, and
the row's speedup over it). A one-client row with M requests covers other prompts, whose replies
may be shorter or longer, so it is not the N-client row's baseline.
Bounded: localhost only, at most --clients x --requests requests per row, --time-limit per row.

Feeds docs/benchmarks/serving.md, section "Serving (issue 21)".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompts(n: int) -> list[str]:
    from nbdiff.resources import distill_prompts

    lines = distill_prompts().read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["prompt"] for line in lines[:n]]


class Server:
    """A server subprocess on a free port; `model` is the id its requests name."""

    def __init__(self, name: str, argv: list[str], port: int, model: str, env: dict[str, str]):
        self.name, self.port, self.model = name, port, model
        self.log = open(f"/tmp/serve_load_{re.sub(r'[^a-z0-9]+', '_', name.lower())}.log", "w")
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not answer /health within {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _one(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first, text, usage = None, [], None
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, temperature=0.0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.perf_counter()
                text.append(choice.delta.content)
    end = time.perf_counter()
    return {"prompt": prompt, "text": "".join(text), "tokens": usage, "ttft": (first or end) - start,
            "latency": end - start}


def _one_raw(http: httpx.Client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """`_one` through plain httpx and json (`--client raw`): a lighter load generator on the server's cores."""
    start = time.perf_counter()
    first, text, usage = None, [], None
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", url + "/v1/chat/completions", json=body) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    text.append(choice["delta"]["content"])
    end = time.perf_counter()
    return {"prompt": prompt, "text": "".join(text), "tokens": usage, "ttft": (first or end) - start,
            "latency": end - start}


CLIENT = "openai"


def _load(server: Server, prompts: list[str], clients: int, requests: int, max_tokens: int, limit: float) -> dict:
    """`clients` threads, each sending `requests` requests in turn (client c: prompts[c * requests:][:requests])."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=limit)
    http = httpx.Client(timeout=limit, limits=httpx.Limits(max_connections=clients + 2))
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def run(c: int) -> None:
        for r in range(requests):
            try:
                prompt = prompts[c * requests + r]
                out = (_one(client, server.model, prompt, max_tokens) if CLIENT == "openai"
                       else _one_raw(http, server.url, server.model, prompt, max_tokens))
            except Exception as exc:  # noqa: BLE001 - reported in the row
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                return
            with lock:
                results.append(out)

    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, limit - (time.perf_counter() - start)))
    wall = time.perf_counter() - start
    http.close()
    tokens = sum(r["tokens"] or 0 for r in results)
    q = lambda xs, p: statistics.quantiles(xs, n=100, method="inclusive")[p - 1] if len(xs) > 1 else (xs[0] if xs else 0.0)  # noqa: E731
    ttft, lat = [r["ttft"] for r in results], [r["latency"] for r in results]
    return {"server": server.name, "clients": clients, "requests": len(results), "errors": errors[:3],
            "tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "ttft_p50": round(q(ttft, 50), 3), "ttft_p95": round(q(ttft, 95), 3),
            "latency_p50": round(q(lat, 50), 3), "latency_p95": round(q(lat, 95), 3),
            "replies": {r["prompt"]: r["text"] for r in results}}


def _servers(args) -> list[tuple[str, list[str], str, dict[str, str]]]:
    """(name, argv without --port, model id, environment on top of the common one) per configuration."""
    nbdiff = [sys.executable, "-m", "nbdiff_cli.app", "serve", args.model, "--model-name", "bench", "--block-size", "1",
              "--dtype", args.dtype, "--max-queue", "256", "--request-timeout", str(args.time_limit)]
    # batching off first: its replies are every prompt's lone reply, the reference of the "same" column
    rows = [("nbdiff serve, batching off (--max-batch 1)", nbdiff + ["--max-batch", "1"], "bench", {}),
            ("nbdiff serve, batching on (--max-batch 8)", nbdiff + ["--max-batch", "8"], "bench", {})]
    if args.ablation:
        rows.append(("nbdiff serve, batching on, no prefix cache (--prefix-cache 0)",
                     nbdiff + ["--max-batch", "8", "--prefix-cache", "0"], "bench", {}))
        rows.append(("nbdiff serve, batching on, torch's products (NBDIFF_CPU_KERNEL=0)",
                     nbdiff + ["--max-batch", "8"], "bench", {"NBDIFF_CPU_KERNEL": "0"}))
    if args.transformers:
        exe = shutil.which("transformers")
        if exe is None:
            print("transformers serve: the `transformers` command is not installed", file=sys.stderr)
        else:
            dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(args.dtype, "auto")
            rows.append(("transformers serve --continuous-batching",
                         [exe, "serve", "--continuous-batching", "--dtype", dtype, "--device", "cpu", args.model],
                         args.model, {}))
    return rows


def _started(name: str, argv: list[str], model: str, env: dict[str, str], warm_prompt: str) -> Server:
    """A fresh server of this configuration on a free port, answered /health and warmed up."""
    port = _free_port()
    argv = argv[:2] + ["--port", str(port)] + argv[2:] if "transformers" in argv[0] else argv + ["--port", str(port)]
    server = Server(name, argv, port, model, env)
    try:
        server.wait(300)
        _one(openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0), model, warm_prompt, 4)
    except BaseException:
        server.stop()
        raise
    return server


def _print(name: str, n: int, row: dict) -> None:
    print(f"{name:45s} clients={n} requests={row['requests']} same={row['same']} tokens/s={row['tokens_per_s']:.1f}"
          + (f" (one at a time: {row['sequential_tokens_per_s']:.1f}, {row['speedup']:.2f}x)" if "speedup" in row else "")
          + f" ttft p50/p95={row['ttft_p50']:.2f}/{row['ttft_p95']:.2f} s "
          f"latency p50/p95={row['latency_p50']:.2f}/{row['latency_p95']:.2f} s"
          + (f" errors={row['errors']}" if row["errors"] else ""), flush=True)


def _configuration(name, argv, model, env, args, slices, reference) -> list[dict]:
    """Every client count on one server; then each count's requests one at a time on a fresh twin."""
    rows = []
    server = _started(name, argv, model, env, WARM)
    try:
        for n, prompts in slices:
            rows.append(_load(server, prompts, n, args.requests, args.max_tokens, args.time_limit))
    finally:
        server.stop()
    if not args.no_sequential and "--max-batch 1" not in name and any(n > 1 for n, _ in slices):
        twin = _started(name + " (one at a time)", argv, model, env, WARM)
        try:
            for row, (n, prompts) in zip(rows, slices):
                if n > 1:  # the same requests in the same order of rows, so both servers' caches saw the same
                    alone = _load(twin, prompts, 1, n * args.requests, args.max_tokens, args.time_limit)
                    row["sequential_tokens_per_s"] = alone["tokens_per_s"]
                    row["speedup"] = round(row["tokens_per_s"] / alone["tokens_per_s"], 2) if alone["tokens_per_s"] else None
        finally:
            twin.stop()
    for row, (n, _) in zip(rows, slices):
        for prompt, text in row["replies"].items():
            reference.setdefault(prompt, text)
        row["same"] = sum(reference[p] == t for p, t in row["replies"].items())
        _print(name, n, row)
    return rows


WARM = "Say hello."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a converted model folder (a plain transformers checkpoint)")
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--transformers", action="store_true", help="also measure `transformers serve --continuous-batching`")
    parser.add_argument("--no-sequential", action="store_true",
                        help="skip the one-at-a-time runs (1 client sending each row's requests in turn, on a fresh server)")
    parser.add_argument("--client", choices=["openai", "raw"], default="openai",
                        help="load generator: the openai client, or plain httpx + json (lighter on the shared cores)")
    parser.add_argument("--ablation", action="store_true",
                        help="also batching on without the prefix cache, and without the CPU kernel")
    parser.add_argument("--only", default=None, help="run only the configurations whose name contains this")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every server (default: torch's choice)")
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds per row at most")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    global CLIENT
    CLIENT = args.client
    counts = [int(c) for c in args.clients.split(",")]
    prompts = _prompts(sum(counts) * args.requests)
    slices, at = [], 0  # each row its own prompts: no request repeats one an earlier row sent (prefix caches)
    for n in counts:
        slices.append((n, prompts[at : at + n * args.requests]))
        at += n * args.requests
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_PROXY": "127.0.0.1,localhost"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    rows, reference = [], {}
    for name, argv, model, extra in _servers(args):
        if args.only and args.only not in name:
            continue
        try:
            rows += _configuration(name, argv, model, {**env, **extra}, args, slices, reference)
        except RuntimeError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            rows.append({"server": name, "error": str(exc)})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
