"""nbdiff beside llama.cpp on the same weights, same prompts, greedy, same threads, in one run.

    python benchmarks/llamacpp_compare.py --llama-build /work/llama/build \\
        --gguf qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --nbdiff /work/models/qwen05-nbdiff \\
        --name qwen05 --threads 2 --out-dir /tmp/llamacpp

Four measurements (pick with --parts single,rounds,forward,serve):
  single  one stream: the first --prompts prompts of the bench suite `code`, chat template applied,
          greedy, block size 1. nbdiff through the Python API (nbdiff.stream: the first token comes
          from the prefill, so "prefill excluded" is (tokens - 1) / (end - first token)); llama.cpp's
          `llama-completion` on the same templated text (`--ignore-eos -n` nbdiff's reply length, so
          both decode the same number of tokens; its own perf counters, load excluded), and
          `llama-bench -p PROMPT -n TOKENS` (prefill, generation) as llama.cpp's own reference.
  forward the cost of one cached forward of 1, 2, 4, 8, 16 tokens at depth 256: nbdiff through
          benchmarks/cpu_kernel.py's `forwards` (kernel off and on; the timed step includes a copy of
          the 256-token cache), llama.cpp through `llama-bench -p 1,2,4,8,16 -n 0 -d 256`.
  rounds  single stream again, interleaved: --rounds rounds, each running every engine once over the same
          prompts (--suites: the first --prompts prompts of each bench suite), the engines' order turned
          by one each round, so a drift of the machine's memory speed (minutes long on a shared host)
          falls on every engine alike. Engines: nbdiff block 1 (nbdiff.stream, kernel and lean forward on),
          transformers' generate() on the same loaded model with nbdiff's kernel taken out
          (cpu_kernel.uninstall: plain nn.Linear, the model's own forward; greedy, KV cache), and
          llama-completion on each of --variants. Reported: each engine's tokens/s per round (prefill
          included), the ratio nbdiff / engine within each round, and its median, low and high.
          Without --llama-build (and --parts rounds alone) only nbdiff's engines run: a drafter
          against another, e.g. --exact-drafters lookup+DIR1,lookup+DIR2,ngram.
  serve   `nbdiff serve --max-batch 8` against `llama-server -np 8`: 1 client, then 8 concurrent
          clients, each sending --requests streamed chat requests (benchmarks/serve_load.py's load
          generator and prompts), `--serve-tokens` tokens each; replies compared with nbdiff's.
          `--serve-rounds N`: all servers up at once (an idle one waits without using the CPU), N
          interleaved rounds with new prompts each, per-round ratios of latency, TTFT and tokens/s.

llama.cpp runs every GGUF of --variants: `source` (the GGUF as given, e.g. Q4_K_M: what llama.cpp's
users run), `F32` and `BF16` (`llama-quantize --allow-requantize` of it, written once into
--work-dir: the same weights nbdiff's folder holds, dequantized). nbdiff runs each of
--nbdiff-dtypes (fp32 is its fast dtype on a CPU without AVX512-BF16). The nbdiff model is loaded
only while its own part runs, so a 1.5B in fp32 is never held twice. Writes NAME.json and
NAME.md (markdown tables) into --out-dir. Timed figures: run it alone on the machine.

Feeds docs/benchmarks/llamacpp.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_kernel as kernel_bench  # noqa: E402  (benchmarks/cpu_kernel.py: the forward-cost method)
import serve_load  # noqa: E402  (benchmarks/serve_load.py: servers on free ports and the load generator)

ROWS = [1, 2, 4, 8, 16]


def _bin(build: Path, *names: str) -> Path:
    for name in names:
        for path in (build / "bin" / name, build / name):
            if path.is_file():
                return path
    raise SystemExit(f"no {' or '.join(names)} in {build}/bin: build it (cmake --build {build} --target {names[0]})")


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).splitlines()[-5:])
        raise SystemExit(f"{Path(argv[0]).name} failed ({done.returncode}):\n{tail}")
    return done


def gguf_variants(args) -> dict[str, Path]:
    """variant name -> GGUF path; F32 / BF16 are requantized from the source once (kept in --work-dir)."""
    out = {}
    for v in args.variants.split(","):
        if v == "source":
            out[v] = Path(args.gguf)
            continue
        target = Path(args.work_dir) / f"{Path(args.gguf).stem}-{v.lower()}.gguf"
        if not target.exists():
            tmp = target.with_suffix(".part")
            _run([str(_bin(args.llama_build, "llama-quantize")), "--allow-requantize", args.gguf, str(tmp), v, "2"], 1800)
            tmp.rename(target)
        out[v] = target
    return out


def _load_mode(args) -> list[str]:
    """llama.cpp's -lm: 'auto' maps the GGUF (pages fault in from disk while a cold file decodes);
    'none' reads it into memory before the clock starts, as nbdiff's load does."""
    return [] if args.llama_load_mode == "auto" else ["-lm", args.llama_load_mode]


def llama_bench(args, gguf: Path, extra: list[str]) -> list[dict]:
    argv = [str(_bin(args.llama_build, "llama-bench")), "-m", str(gguf), "-t", str(args.threads),
            "-r", str(args.repeat_llama), "-o", "json", *_load_mode(args), *extra]
    return json.loads(_run(argv, 1800).stdout)


def _templated(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


PERF = re.compile(r"(prompt eval|eval) time =\s*([\d.]+) ms /\s*(\d+) (tokens|runs)")


def llama_completion(args, gguf: Path, text: str, new_tokens: int) -> dict:
    """One greedy reply of exactly `new_tokens` tokens; llama.cpp's perf counters (model load excluded).
    The prompt goes in -p with --no-escape: -f drops the template's final newline, escapes would change code."""
    argv = [str(_bin(args.llama_build, "llama-completion", "llama-cli")), "-m", str(gguf), "-p", text, "--no-escape",
            "-n", str(new_tokens), "--ignore-eos", "--temp", "0", "-s", "0", "-t", str(args.threads),
            "-tb", str(args.threads), "-c", str(args.context), "-no-cnv", "--no-display-prompt", *_load_mode(args)]
    done = _run(argv, 1800)
    perf = {}
    for line in done.stderr.splitlines():
        if "perf" in line:  # common_perf_print / llama_perf_context_print, by version
            m = PERF.search(line)
            if m:
                perf[m.group(1)] = (float(m.group(2)), int(m.group(3)))
    if "prompt eval" not in perf or "eval" not in perf:
        raise SystemExit("llama-completion printed no perf counters: " + "\n".join(done.stderr.splitlines()[-5:]))
    (p_ms, p_tok), (e_ms, e_runs) = perf["prompt eval"], perf["eval"]
    return {"prompt_tokens": p_tok, "new_tokens": new_tokens, "prefill_ms": p_ms, "decode_ms": e_ms, "decode_runs": e_runs,
            "tokens_per_s": round(new_tokens / ((p_ms + e_ms) / 1e3), 2),
            "tokens_per_s_no_prefill": round(e_runs / (e_ms / 1e3), 2) if e_runs else None,
            "text": done.stdout}


LOOKUP = re.compile(r"(encoded|decoded)\s+(\d+) tokens in\s+([\d.]+) seconds")
LOOKUP_COUNTS = re.compile(r"(n_drafted|n_accept)\s*=\s*(\d+)")


def llama_lookup(args, gguf: Path, text: str, new_tokens: int) -> dict:
    """One greedy reply through llama.cpp's prompt lookup decoding (llama-lookup: n-grams of the prompt and the
    reply drafted, verified by the model; `--spec-draft-n-max` tokens at most per draft). It stops past
    `new_tokens` (it may overshoot by a draft); tokens/s from its own encode + decode clocks."""
    argv = [str(_bin(args.llama_build, "llama-lookup")), "-m", str(gguf), "-p", text, "--no-escape",
            "-n", str(new_tokens), "--ignore-eos", "--temp", "0", "-s", "0", "-t", str(args.threads),
            "-tb", str(args.threads), "-c", str(args.context), "--spec-draft-n-max", str(args.lookup_draft),
            *_load_mode(args)]
    done = _run(argv, 1800)
    clocks = {m.group(1): (int(m.group(2)), float(m.group(3))) for m in LOOKUP.finditer(done.stderr + done.stdout)}
    counts = {m.group(1): int(m.group(2)) for m in LOOKUP_COUNTS.finditer(done.stderr + done.stdout)}
    if "encoded" not in clocks or "decoded" not in clocks:
        raise SystemExit("llama-lookup printed no clocks: " + "\n".join(done.stderr.splitlines()[-5:]))
    (p_tok, p_s), (n, d_s) = clocks["encoded"], clocks["decoded"]
    out = done.stdout  # the prompt, then the reply: keep what follows the prompt's end
    tail = text[-40:]
    cut = out.rfind(tail)
    return {"prompt_tokens": p_tok, "new_tokens": n, "prefill_ms": round(p_s * 1e3, 1), "decode_ms": round(d_s * 1e3, 1),
            "tokens_per_s": round(n / (p_s + d_s), 2), "drafted": counts.get("n_drafted"), "accepted": counts.get("n_accept"),
            "text": out[cut + len(tail):] if cut >= 0 else out}


def same_reply(nbdiff_run: dict, llama_text: str) -> bool:
    """llama.cpp's reply is nbdiff's: equal, or where nbdiff ended at EOS, nbdiff's text followed by what
    --ignore-eos made llama.cpp write instead of EOS (it bans EOS and takes the next best token)."""
    a, b = nbdiff_run["text"].strip(), llama_text.strip()
    return a == b or (nbdiff_run["finish"] == "eos" and b.startswith(a))


def nbdiff_stream(model, tokenizer, prompt: str, max_new_tokens: int, **overrides) -> dict:
    """One greedy reply through nbdiff.stream (block size 1 unless `overrides` say otherwise, e.g. exact=True:
    the drafting plan's block size), with the time its first token arrived."""
    import nbdiff
    from nbdiff.decode.events import FinalEvent

    start = time.perf_counter()
    first = final = None
    settings = {"block_size": 1, **overrides} if not overrides.get("exact") else overrides
    for event in nbdiff.stream(model, tokenizer, prompt, max_new_tokens=max_new_tokens, **settings):
        if first is None and getattr(event, "tokens", None) and not isinstance(event, FinalEvent):
            first = time.perf_counter()
        if isinstance(event, FinalEvent):
            final = event
    end = time.perf_counter()
    n = final.new_tokens
    out = {"prompt_tokens": final.prompt_tokens, "new_tokens": n, "finish": final.finish_reason,
           "prefill_ms": round((first - start) * 1e3, 1), "decode_ms": round((end - first) * 1e3, 1),
           "tokens_per_s": round(n / (end - start), 2),
           "tokens_per_s_no_prefill": round((n - 1) / (end - first), 2) if n > 1 else None,
           "forwards": getattr(final, "forwards", None), "text": final.texts[0], "tokens": final.tokens[0]}
    if getattr(final, "verified_blocks", 0):  # drafted and verified (exact mode, a drafter): how much was kept
        out.update(verifies=final.verified_blocks, drafted=final.drafted, accepted=final.accepted,
                   tokens_per_verify=round(final.accepted_length, 3),
                   accept_rate_per_pos=[round(k / final.verified_blocks, 3) for k in final.accepted_at],
                   drafter_forwards=final.drafter_forwards)
    return out


def _load(path: str, dtype: str):
    import nbdiff

    model, tokenizer = nbdiff.load(path, device="cpu", dtype=dtype)
    return model, tokenizer


def part_single(args, ggufs: dict[str, Path], prompts: list[str]) -> dict:
    out: dict = {"prompts": prompts, "nbdiff": {}, "llama": {}, "llama_bench": {}}
    lengths = None
    for dtype in args.nbdiff_dtypes.split(","):
        model, tokenizer = _load(args.nbdiff, dtype)
        nbdiff_stream(model, tokenizer, "Say hello.", 4)  # warm-up: first-call allocations
        runs = [nbdiff_stream(model, tokenizer, p, args.tokens) for p in prompts]
        out["nbdiff"][dtype] = {"dtype": str(model.dtype).replace("torch.", ""),
                                "kernel": getattr(getattr(model, "_nbdiff_cpu_kernel", None), "reason", "off"), "runs": runs}
        lengths = lengths or [r["new_tokens"] for r in runs]
        texts = [_templated(tokenizer, p) for p in prompts]
        del model
        gc.collect()
    for v, gguf in ggufs.items():
        runs = [llama_completion(args, gguf, t, n) for t, n in zip(texts, lengths)]
        ref = out["nbdiff"].get("fp32", next(iter(out["nbdiff"].values())))["runs"]
        for r, nb in zip(runs, ref):
            r["same_text_as_nbdiff"] = same_reply(nb, r["text"])
        out["llama"][v] = {"runs": runs}
        p = round(sum(r["prompt_tokens"] for r in runs) / len(runs))
        out["llama_bench"][v] = [{k: row.get(k) for k in ("n_prompt", "n_gen", "avg_ts", "stddev_ts", "model_type", "build_commit", "build_number")}
                                 for row in llama_bench(args, gguf, ["-p", str(p), "-n", str(args.tokens)])]
    return out


def hf_generate(model, tokenizer, prompt: str, new_tokens: int, eos_last: bool = False) -> dict:
    """transformers' generate() on the templated prompt: greedy, its own KV cache, `new_tokens` tokens (EOS
    held back until then; eos_last: the reply nbdiff ended at EOS, so EOS may come as the last one), timed
    from the call to the last token."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens - 1 if eos_last else new_tokens, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    tokens = out[0, ids.shape[1]:].tolist()
    return {"prompt_tokens": ids.shape[1], "new_tokens": len(tokens), "seconds": round(seconds, 3),
            "tokens_per_s": round(len(tokens) / seconds, 2), "tokens": tokens}


def part_rounds(args, ggufs: dict[str, Path]) -> dict:
    """Interleaved single-stream rounds (see the module's doc): every engine once per round, order turned."""
    from nbdiff.cpu_kernel import install, uninstall
    from nbdiff.resources import bench_suites_dir

    suites = args.suites.split(",")
    prompts = []
    for suite in suites:
        path = Path(suite) if suite.endswith(".jsonl") else bench_suites_dir() / f"{suite}.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines()[:args.prompts]
        prompts += [(path.stem, json.loads(line)["prompt"]) for line in lines]
    model, tokenizer = _load(args.nbdiff, "fp32")
    nbdiff_stream(model, tokenizer, "Say hello.", 4)  # warm-up: first-call allocations
    first = [nbdiff_stream(model, tokenizer, p, args.tokens) for _, p in prompts]  # the lengths every engine decodes
    lengths = [r["new_tokens"] for r in first]
    texts = [_templated(tokenizer, p) for _, p in prompts]

    def run_nbdiff():
        install(model, bf16_weights=True)  # as load_model does: a folder stored in bf16 keeps bf16 weights (fp32 sums)
        runs = [nbdiff_stream(model, tokenizer, p, n) for (_, p), n in zip(prompts, lengths)]
        assert [r["new_tokens"] for r in runs] == lengths, "nbdiff's replies changed length between rounds"
        return runs

    def run_generate():
        uninstall(model)
        try:
            return [hf_generate(model, tokenizer, p, n, r["finish"] == "eos") for (_, p), n, r in zip(prompts, lengths, first)]
        finally:
            install(model, bf16_weights=True)

    def run_exact(spec: str):
        install(model, bf16_weights=True)
        from nbdiff.decode import plan

        drafter, *settings = spec.split("@")  # DRAFTER@name=value@...: decoding options of that row (e.g. draft_threshold=0)
        extra = {name: int(float(value)) if float(value).is_integer() and name == "block_size" else float(value)
                 for name, value in (s.split("=", 1) for s in settings)}
        default = plan.COST_CUT
        if "cost_cut" in extra:  # @cost_cut=1 / 0: drafts cut by cost / by the threshold alone (else the plan's default)
            plan.COST_CUT = bool(extra.pop("cost_cut"))
        try:
            return [nbdiff_stream(model, tokenizer, p, n, exact=True, drafter=drafter, **extra) for (_, p), n in zip(prompts, lengths)]
        finally:
            plan.COST_CUT = default

    engines = {"nbdiff block 1 (fp32)": run_nbdiff, "transformers generate() (fp32)": run_generate}
    if args.nbdiff_exact:
        for drafter in args.exact_drafters.split(","):
            label = "plan auto" if drafter == "auto" else f"--drafter {drafter}"
            engines[f"nbdiff --exact (fp32, {label})"] = (lambda d=drafter: run_exact(d))
    for v, gguf in ggufs.items():
        engines[f"llama-completion ({v})"] = (lambda g=gguf: [llama_completion(args, g, t, n) for t, n in zip(texts, lengths)])
        if args.llama_lookup:
            engines[f"llama-lookup ({v}, draft {args.lookup_draft})"] = (
                lambda g=gguf: [llama_lookup(args, g, t, n) for t, n in zip(texts, lengths)])
    names = list(engines)
    rounds = []
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        got = {}
        for name in order:
            runs = engines[name]()
            seconds = sum(x["new_tokens"] / x["tokens_per_s"] for x in runs)
            got[name] = {"tokens_per_s": round(sum(x["new_tokens"] for x in runs) / seconds, 2), "runs": runs}
            print(f"round {r + 1}/{args.rounds} {name:36s} {got[name]['tokens_per_s']:7.2f} tokens/s", flush=True)
        rounds.append({"order": order, "engines": got})
    ref = first
    for rnd in rounds:
        for name, e in rnd["engines"].items():
            if name.startswith("llama-lookup"):  # it may decode past the length asked (a whole draft at the end)
                e["same_text_as_nbdiff"] = sum(x["text"].strip().startswith(nb["text"].strip()) for nb, x in zip(ref, e["runs"]))
            elif name.startswith("llama-"):
                e["same_text_as_nbdiff"] = sum(same_reply(nb, x["text"]) for nb, x in zip(ref, e["runs"]))
            elif not name.startswith("nbdiff block 1"):
                e["same_tokens_as_nbdiff"] = sum(nb["tokens"] == x["tokens"] for nb, x in zip(ref, e["runs"]))
            for x in e["runs"]:
                x.pop("tokens", None)
    for x in first:
        x.pop("tokens", None)
    del model
    gc.collect()
    return {"suites": suites, "prompts": [p for _, p in prompts], "new_tokens": lengths, "engines": names,
            "nbdiff_first_run": first, "rounds": rounds}


def _drafts(runs: list[dict]) -> str:
    """Tokens per target forward of a drafting engine's replies (nbdiff: its forward count; llama-lookup:
    1 + accepted tokens per decoded token run), else '-'."""
    if runs and all(r.get("forwards") for r in runs) and any(r["forwards"] != r["new_tokens"] for r in runs):
        return f"{sum(r['new_tokens'] for r in runs) / sum(r['forwards'] for r in runs):.2f} tokens/forward"
    if runs and all(r.get("drafted") is not None for r in runs):
        drafted, accepted = sum(r["drafted"] for r in runs), sum(r["accepted"] for r in runs)
        return f"{accepted}/{drafted} drafted tokens kept"
    return "-"


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return (xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2) if xs else None


def part_forward(args, ggufs: dict[str, Path]) -> dict:
    from nbdiff.cpu_kernel import cpu_isa, dtypes, status

    out: dict = {"depth": args.depth, "rows": ROWS, "nbdiff": {}, "llama": {}}
    for dtype in args.nbdiff_dtypes.split(","):
        model, _ = _load(args.nbdiff, dtype)
        state = status()
        rows = kernel_bench.forwards(model, ROWS, args.repeat, args.depth, state.isa)
        # bf16 without AVX512-BF16: install() leaves torch's products, so "kernel_ms" times those again
        takes = state.ready and model.dtype in dtypes(cpu_isa())
        out["nbdiff"][dtype] = {"kernel": state.reason, "kernel_takes_dtype": takes, "rows": rows}
        del model
        gc.collect()
    for v, gguf in ggufs.items():
        bench = llama_bench(args, gguf, ["-p", ",".join(map(str, ROWS)), "-n", "0", "-d", str(args.depth)])
        out["llama"][v] = [{"rows": row["n_prompt"], "ms": round(row["avg_ns"] / 1e6, 2), "avg_ts": row["avg_ts"],
                            "model_type": row.get("model_type")} for row in bench]
    return out


def part_serve(args, ggufs: dict[str, Path]) -> dict:
    """Each server answers 1 client, then --clients together. With --serve-rounds N every server stays up and
    the rounds are interleaved (the order turned each round, new prompts each round, the same prompts for
    every server within a round), so a drift of the machine's speed shows in the per-round ratios."""
    counts = [1, args.clients]
    per_round = sum(counts) * args.requests
    prompts = serve_load._prompts(per_round * args.serve_rounds)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_PROXY": "127.0.0.1,localhost",
           "OMP_NUM_THREADS": str(args.threads)}
    configs = [(f"nbdiff serve --max-batch {args.clients} ({dtype})",
                [sys.executable, "-m", "nbdiff_cli.app", "serve", args.nbdiff, "--model-name", "bench", "--block-size", "1",
                 "--dtype", dtype, "--max-batch", str(args.clients), "--max-queue", "256",
                 "--request-timeout", str(args.time_limit)])
               for dtype in args.serve_dtypes.split(",")]
    server_bin = str(_bin(args.llama_build, "llama-server"))
    for v in args.serve_variants.split(","):
        configs.append((f"llama-server -np {args.clients} ({v})",
                        [server_bin, "-m", str(ggufs[v]), "-np", str(args.clients), "-c", str(args.clients * args.slot_context),
                         "-t", str(args.threads), "-tb", str(args.threads), "--host", "127.0.0.1", "-a", "bench",
                         "--no-webui", *_load_mode(args)]))
    rows, reference = [], {}

    def measure(name: str, server, r: int) -> None:
        at = r * per_round
        for n in counts:
            ps, at = prompts[at: at + n * args.requests], at + n * args.requests
            row = serve_load._load(server, ps, n, args.requests, args.serve_tokens, args.time_limit)
            row["round"] = r
            rows.append(row)
            print(f"round {r + 1} {name:40s} clients={n} tokens/s={row['tokens_per_s']:.1f} "
                  f"latency p50={row['latency_p50']:.2f} s", flush=True)

    if args.serve_rounds == 1:  # one server up at a time
        for name, argv in configs:
            server = serve_load._started(name, argv, "bench", env, serve_load.WARM)
            try:
                measure(name, server, 0)
            finally:
                server.stop()
    else:
        servers = []
        try:
            for name, argv in configs:
                servers.append((name, serve_load._started(name, argv, "bench", env, serve_load.WARM)))
            for r in range(args.serve_rounds):
                for name, server in servers[r % len(servers):] + servers[:r % len(servers)]:
                    measure(name, server, r)
        finally:
            for _, server in servers:
                server.stop()
    for row in rows:  # the first configuration's (nbdiff's) replies are the reference
        if row["server"] == configs[0][0]:
            reference.update(row["replies"])
    for row in rows:
        row["same_as_first"] = sum(reference.get(p) == t for p, t in row["replies"].items())
    return {"clients": counts, "requests_per_client": args.requests, "max_tokens": args.serve_tokens,
            "rounds": args.serve_rounds, "rows": rows}


def _git(*argv: str) -> str:
    """What the checkout of the nbdiff that runs (the one imported: PYTHONPATH may point at another worktree) was
    when the figures were taken (library files changed but not committed count)."""
    import nbdiff

    done = subprocess.run(["git", *argv], capture_output=True, text=True, cwd=Path(nbdiff.__file__).resolve().parent.parent)
    return done.stdout.strip()


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 2) if xs else None


def markdown(report: dict) -> str:
    lines = [f"{report['name']}: {report['cpu']}, {report['threads']} threads, torch {report['torch']}, "
             f"llama.cpp build {report.get('llama_build', '?')}, nbdiff {report.get('nbdiff_commit', '?')}"
             f"{' + uncommitted library changes' if report.get('nbdiff_library_changes') else ''}, {report['date']}", ""]
    single = report.get("single")
    if single:
        lines += ["| engine, weights | prompt tokens | new tokens | tokens/s, prefill included | tokens/s, prefill excluded | "
                  "nbdiff's first dtype / this (incl. / excl.) | same text as nbdiff's |",
                  "|---|---|---|---|---|---|---|"]
        base = next(iter(single["nbdiff"].values()))["runs"]
        base = (_mean([x["tokens_per_s"] for x in base]), _mean([x["tokens_per_s_no_prefill"] for x in base]))
        ratio = lambda a, b: f"{base[0] / a:.2f}x / {base[1] / b:.2f}x" if a and b else "-"  # noqa: E731
        for dtype, r in single["nbdiff"].items():
            runs = r["runs"]
            lines.append(f"| nbdiff block 1, {r['dtype']} | {_mean([x['prompt_tokens'] for x in runs])} | "
                         f"{sum(x['new_tokens'] for x in runs)} | {_mean([x['tokens_per_s'] for x in runs])} | "
                         f"{_mean([x['tokens_per_s_no_prefill'] for x in runs])} | "
                         f"{ratio(_mean([x['tokens_per_s'] for x in runs]), _mean([x['tokens_per_s_no_prefill'] for x in runs]))} | - |")
        for v, r in single["llama"].items():
            runs = r["runs"]
            kind = (single["llama_bench"][v][0].get("model_type") or v) if single["llama_bench"].get(v) else v
            lines.append(f"| llama-completion, {v} ({kind}) | {_mean([x['prompt_tokens'] for x in runs])} | "
                         f"{sum(x['new_tokens'] for x in runs)} | {_mean([x['tokens_per_s'] for x in runs])} | "
                         f"{_mean([x['tokens_per_s_no_prefill'] for x in runs])} | "
                         f"{ratio(_mean([x['tokens_per_s'] for x in runs]), _mean([x['tokens_per_s_no_prefill'] for x in runs]))} | "
                         f"{sum(x['same_text_as_nbdiff'] for x in runs)}/{len(runs)} |")
        for v, rows in single["llama_bench"].items():
            pp = next((x for x in rows if x["n_gen"] == 0), None)
            tg = next((x for x in rows if x["n_prompt"] == 0), None)
            lines.append(f"| llama-bench, {v}: pp{pp and pp['n_prompt']} / tg{tg and tg['n_gen']} | | | "
                         f"pp {pp and round(pp['avg_ts'], 1)} | tg {tg and round(tg['avg_ts'], 2)} | "
                         f"- / {base[1] / tg['avg_ts'] if tg else 0:.2f}x | |")
        lines.append("")
    rnds = report.get("rounds")
    if rnds:
        names, base = rnds["engines"], rnds["engines"][0]
        plain = next((n for n in names if n.startswith("llama-completion")), None)

        def per_round(a: str, b: str | None) -> str:
            if b is None or a == b:
                return "-"
            ratios = [r["engines"][a]["tokens_per_s"] / r["engines"][b]["tokens_per_s"] for r in rnds["rounds"]]
            return f"**{_median(ratios):.2f}x** ({min(ratios):.2f} - {max(ratios):.2f})"

        lines += [f"{len(rnds['rounds'])} interleaved rounds, {len(rnds['prompts'])} prompts ({', '.join(rnds['suites'])}), "
                  f"{sum(rnds['new_tokens'])} new tokens per engine per round; tokens/s prefill included", "",
                  "| engine | tokens/s per round | median | nbdiff / this, per round: median (low - high) | "
                  f"this / {plain or '-'}, per round: median (low - high) | same reply as nbdiff | drafts |",
                  "|---|---|---|---|---|---|---|"]
        for name in names:
            speeds = [r["engines"][name]["tokens_per_s"] for r in rnds["rounds"]]
            last = rnds["rounds"][-1]["engines"][name]
            same = (f"{last['same_text_as_nbdiff']}/{len(last['runs'])} (text)" if "same_text_as_nbdiff" in last else
                    f"{last['same_tokens_as_nbdiff']}/{len(last['runs'])} (tokens)" if "same_tokens_as_nbdiff" in last else "-")
            lines.append(f"| {name} | {' / '.join(f'{x:.2f}' for x in speeds)} | {_median(speeds):.2f} | "
                         f"{per_round(base, name)} | {per_round(name, plain)} | {same} | {_drafts(last['runs'])} |")
        lines.append("")
    fwd = report.get("forward")
    if fwd:
        heads, cols = [], []
        for dtype, r in fwd["nbdiff"].items():
            heads.append(f"nbdiff {dtype}, torch's products")
            cols.append({x["rows"]: x["torch_ms"] for x in r["rows"]})
            if r.get("kernel_takes_dtype", True):
                heads.append(f"nbdiff {dtype}, nbdiff.cpu_kernel")
                cols.append({x["rows"]: x["kernel_ms"] for x in r["rows"]})
        for v, rows in fwd["llama"].items():
            heads.append(f"llama.cpp {v}")
            cols.append({x["rows"]: x["ms"] for x in rows})
        lines += [f"ms per forward at depth {fwd['depth']} (x one token's cost)", "",
                  "| tokens | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
        for n in fwd["rows"]:
            cells = [f"{c[n]:.1f} ({c[n] / c[1]:.2f}x)" if n in c and 1 in c else "-" for c in cols]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    serve = report.get("serve")
    if serve:
        lines += [f"{serve['max_tokens']}-token streamed chat replies, {serve['requests_per_client']} requests per client", "",
                  "| server | clients | requests | tokens/s | latency p50 / p95 s | TTFT p50 / p95 s | replies equal to nbdiff's |",
                  "|---|---|---|---|---|---|---|"]
        for r in serve["rows"]:
            lines.append(f"| {r['server']} | {r['clients']} | {r['requests']} | {r['tokens_per_s']} | {r['latency_p50']} / {r['latency_p95']} | "
                         f"{r['ttft_p50']} / {r['ttft_p95']} | {r['same_as_first']}/{r['requests']} |")
        lines.append("")
        if serve.get("rounds", 1) > 1:
            first = serve["rows"][0]["server"]
            lines += [f"{serve['rounds']} interleaved rounds: per-round ratios, median (low - high)", "",
                      f"| server | clients | latency p50, this / {first} | TTFT p50, this / {first} | tokens/s, {first} / this |",
                      "|---|---|---|---|---|"]
            by = {(r["server"], r["clients"], r["round"]): r for r in serve["rows"]}
            for name in dict.fromkeys(r["server"] for r in serve["rows"]):
                if name == first:
                    continue
                for n in serve["clients"]:
                    pairs = [(by[(name, n, k)], by[(first, n, k)]) for k in range(serve["rounds"])
                             if (name, n, k) in by and (first, n, k) in by]
                    cell = lambda xs: f"**{_median(xs):.2f}x** ({min(xs):.2f} - {max(xs):.2f})" if xs else "-"  # noqa: E731
                    lines.append(f"| {name} | {n} | {cell([a['latency_p50'] / b['latency_p50'] for a, b in pairs])} | "
                                 f"{cell([a['ttft_p50'] / b['ttft_p50'] for a, b in pairs if b['ttft_p50']])} | "
                                 f"{cell([b['tokens_per_s'] / a['tokens_per_s'] for a, b in pairs if a['tokens_per_s']])} |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-build", type=Path, required=False, help="llama.cpp's CMake build folder (binaries in bin/)")
    parser.add_argument("--gguf", help="the GGUF the nbdiff folder was converted from")
    parser.add_argument("--nbdiff", help="the nbdiff folder (`nbdiff convert GGUF --out DIR`)")
    parser.add_argument("--name", default=None, help="file name of the outputs (default: the GGUF's stem)")
    parser.add_argument("--parts", default="single,forward,serve")
    parser.add_argument("--variants", default="F32,source,BF16", help="llama.cpp's GGUFs: source, F32, BF16")
    parser.add_argument("--nbdiff-dtypes", default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=3, help="prompts of the bench suite `code` (single stream)")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens at most per single-stream reply")
    parser.add_argument("--context", type=int, default=1024, help="llama-completion's context")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (part `rounds`)")
    parser.add_argument("--nbdiff-exact", action="store_true", help="part `rounds`: add nbdiff --exact (its drafting plan)")
    parser.add_argument("--exact-drafters", default="auto",
                        help="part `rounds` with --nbdiff-exact: one exact row per --drafter value, e.g. auto,ngram "
                             "(DRAFTER@draft_threshold=0: with that decoding option; DRAFTER@cost_cut=1: drafts cut by verify cost, nbdiff.decode.plan.COST_CUT)")
    parser.add_argument("--llama-lookup", action="store_true", help="part `rounds`: add llama-lookup (prompt lookup decoding)")
    parser.add_argument("--lookup-draft", type=int, default=8, help="llama-lookup's --spec-draft-n-max")
    parser.add_argument("--suites", default="code,chat,lists,rewrite,arithmetic",
                        help="bench suites of part `rounds` (a name, or a .jsonl file of {\"prompt\": ...} lines)")
    parser.add_argument("--depth", type=int, default=256, help="cached tokens before a timed forward")
    parser.add_argument("--repeat", type=int, default=10, help="nbdiff's timed forwards per row")
    parser.add_argument("--repeat-llama", type=int, default=3, help="llama-bench -r")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--serve-tokens", type=int, default=32)
    parser.add_argument("--serve-rounds", type=int, default=1,
                        help="part `serve`: interleaved rounds, every server up throughout (new prompts each round)")
    parser.add_argument("--serve-dtypes", default="fp32", help="nbdiff serve --dtype values")
    parser.add_argument("--serve-variants", default="F32,source", help="llama-server GGUFs")
    parser.add_argument("--slot-context", type=int, default=512, help="llama-server context per slot")
    parser.add_argument("--llama-load-mode", default="auto", choices=["auto", "none", "mmap", "mlock"],
                        help="llama.cpp's -lm (none: read the weights into memory at load, like nbdiff)")
    parser.add_argument("--time-limit", type=float, default=600.0)
    parser.add_argument("--work-dir", default="/tmp/llamacpp_compare", help="requantized GGUFs (kept) and scratch files")
    parser.add_argument("--out-dir", default=".")
    parser.add_argument("--render", default=None, help="only print the markdown of an earlier run's JSON file")
    args = parser.parse_args()
    if args.render:
        report = json.loads(Path(args.render).read_text(encoding="utf-8"))
        single = report.get("single")
        if single:  # the same-text rule as it stands now
            ref = single["nbdiff"].get("fp32", next(iter(single["nbdiff"].values())))["runs"]
            for r in single["llama"].values():
                for run, nb in zip(r["runs"], ref):
                    run["same_text_as_nbdiff"] = same_reply(nb, run["text"])
        print(markdown(report))
        return
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    unknown = set(parts) - {"single", "rounds", "forward", "serve"}
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(sorted(unknown))}: pick from single, rounds, forward, serve")
    # part `rounds` alone runs without llama.cpp (nbdiff's engines only: drafters against block 1)
    nbdiff_only = parts == ["rounds"] and args.llama_build is None
    for path, what in ((args.llama_build, "--llama-build"), (args.gguf, "--gguf"), (args.nbdiff, "--nbdiff")):
        if nbdiff_only and what != "--nbdiff":
            continue
        if path is None:
            raise SystemExit(f"{what} is required (see --help)")
        if not Path(path).exists():
            raise SystemExit(f"{what} {path} does not exist")
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    from nbdiff.hardware import cpu_name
    from nbdiff.resources import bench_suites_dir

    name = args.name or Path(args.gguf or args.nbdiff).stem
    variants = set(args.variants.split(","))
    if "serve" in parts:
        variants |= set(args.serve_variants.split(","))
    ggufs = {} if nbdiff_only else gguf_variants(argparse.Namespace(**{**vars(args), "variants": ",".join(sorted(variants))}))
    prompts = [json.loads(line)["prompt"] for line in (bench_suites_dir() / "code.jsonl").read_text(encoding="utf-8").splitlines()[:args.prompts]]
    build = "none (nbdiff only)"
    if not nbdiff_only:
        version = subprocess.run([str(_bin(args.llama_build, "llama-completion", "llama-cli")), "--version"],
                                 capture_output=True, text=True, timeout=60)
        build = (version.stdout + version.stderr).strip().splitlines()[0] if (version.stdout + version.stderr).strip() else "?"
    report = {"name": name, "cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
              "llama_build": build,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "llama_load_mode": args.llama_load_mode, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "gguf": {k: str(v) for k, v in ggufs.items()},
              "nbdiff_commit": _git("rev-parse", "--short", "HEAD"),
              "nbdiff_library_changes": _git("status", "--porcelain", "--", "nbdiff").splitlines()}
    single_ggufs = {} if nbdiff_only else {v: ggufs[v] for v in args.variants.split(",")}
    if "single" in parts:
        report["single"] = part_single(args, single_ggufs, prompts)
    if "rounds" in parts:
        report["rounds"] = part_rounds(args, single_ggufs)
    if "forward" in parts:
        report["forward"] = part_forward(args, single_ggufs)
    if "serve" in parts:
        report["serve"] = part_serve(args, ggufs)
    Path(args.out_dir, f"{name}.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    table = markdown(report)
    Path(args.out_dir, f"{name}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
