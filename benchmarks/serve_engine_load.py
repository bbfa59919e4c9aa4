"""The serving engine without HTTP: N client threads submitting to `nbdiff.serve.engine.Engine` in-process.

    python benchmarks/serve_engine_load.py MODEL_DIR --clients 8 --requests 2 --max-tokens 32 --dtype fp32

What `benchmarks/serve_load.py` measures, minus the web layer and the load generator's process:
first every request alone, one at a time (one client sending the N x M requests in turn), then N
clients each sending M requests one after another, greedy, block size 1, the same chat prompts as
serve_load.py's N-client row. Prints tokens/s of both, the speedup, how many replies are identical
to their lone reply, the engine's forward times by the number of requests in the forward (the
cost of a step of 1 and of 8 rows), and transformers' own generate() on the same prompts, one at a
time (greedy, EOS honoured): its tokens/s and how many of its texts equal the engine's. The gap to serve_load.py's speedup is what HTTP, streaming and
a load generator on the same cores cost.

Feeds docs/benchmarks/serving.md, section "Serving (issue 21)".
"""

from __future__ import annotations

import argparse
import collections
import json
import threading
import time

import torch

from nbdiff.api import encode, resolve_options
from nbdiff.loading import load_model
from nbdiff.resources import distill_prompts
from nbdiff.serve.engine import Delta, Done, Engine, Job
from nbdiff.serve.packed import PackedLane


def _run(engine: Engine, jobs: list[Job], clients: int, requests: int, texts: dict) -> float:
    """Client c sends jobs[c * requests:][:requests] in turn; returns completion tokens per second."""
    tokens, lock = [0], threading.Lock()

    def client(c: int) -> None:
        for k in range(c * requests, (c + 1) * requests):
            finished, parts, done = threading.Event(), [], []

            def sink(item, parts=parts, done=done, finished=finished):
                if isinstance(item, Delta):
                    parts.append(item.text)
                elif isinstance(item, Done):
                    done.append(item)
                    finished.set()

            engine.submit(jobs[k], sink)
            finished.wait()
            with lock:
                tokens[0] += done[0].completion_tokens
                texts.setdefault(k, []).append("".join(parts))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tokens[0] / (time.perf_counter() - start)


def _timed_forwards(log: list) -> None:
    """Record every packed forward's (requests in it, tokens in it, seconds)."""
    plain = PackedLane._forward

    def forward(self, tokens, positions, owner, last):
        start = time.perf_counter()
        out = plain(self, tokens, positions, owner, last)
        log.append((len(set(owner)), len(tokens), time.perf_counter() - start))
        return out

    PackedLane._forward = forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, device="cpu", dtype=args.dtype)
    options, _ = resolve_options(model, None, block_size=1, max_new_tokens=args.max_tokens, temperature=0.0)
    n = args.clients * args.requests
    prompts = [json.loads(line)["prompt"] for line in distill_prompts().read_text(encoding="utf-8").splitlines()[:n]]
    jobs = [Job(encode(tok, [{"role": "user", "content": p}]), options) for p in prompts]
    log: list = []
    _timed_forwards(log)
    texts: dict = {}
    results = {}
    for label, clients, requests in (("one at a time", 1, n), (f"{args.clients} clients", args.clients, args.requests)):
        engine = Engine(model, tok, max_batch=8).start()  # a fresh engine: both runs start with an empty prefix cache
        try:
            _run(engine, [Job(encode(tok, [{"role": "user", "content": "Say hello."}]), options)], 1, 1, {})  # warm up
            log.clear()
            results[label] = _run(engine, jobs, clients, requests, texts)
        finally:
            engine.close()
        steps = collections.defaultdict(list)
        for rows, width, seconds in log:
            if width == rows:  # decoding steps only (no prompt tokens in the forward)
                steps[rows].append(seconds)
        print(f"{label}: {results[label]:.1f} tokens/s; decoding step by rows: "
              + ", ".join(f"{r}: {1000 * sum(v) / len(v):.1f} ms (x{len(v)})" for r, v in sorted(steps.items())), flush=True)
    same = sum(len(set(v)) == 1 for v in texts.values())
    alone, together = results["one at a time"], results[f"{args.clients} clients"]
    print(f"speedup {together / alone:.2f}x; identical replies {same}/{len(texts)}")
    peer, equal = _generate(model, tok, jobs, args.max_tokens, texts)
    print(f"transformers generate(), the same prompts one at a time (EOS honoured): {peer:.1f} tokens/s; "
          f"engine replies equal to generate()'s: {equal}/{len(jobs)}")


@torch.no_grad()
def _generate(model, tok, jobs: list[Job], max_tokens: int, texts: dict) -> tuple[float, int]:
    """transformers' own greedy generate() on the same prompts: tokens/s and how many texts equal the engine's."""
    eos = model.generation_config.eos_token_id
    model.generate(torch.tensor([jobs[0].prompt]), max_new_tokens=2, do_sample=False, eos_token_id=eos)  # warm up
    tokens, equal, start = 0, 0, time.perf_counter()
    for k, job in enumerate(jobs):
        out = model.generate(torch.tensor([job.prompt]), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=tok.pad_token_id or 0)[0, len(job.prompt):]
        tokens += len(out)
        equal += tok.decode(out, skip_special_tokens=True) == texts[k][0]
    return tokens / (time.perf_counter() - start), equal


if __name__ == "__main__":
    main()
