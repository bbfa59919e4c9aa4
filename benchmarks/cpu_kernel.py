"""The small-row CPU kernel (nbdiff/cpu_kernel) and the lean forward (cpu_kernel/fast_forward.py)
against torch's fp32 product and transformers' forward, on this CPU.

Measurements, all with cold caches the way decoding sees them:
  1. products: the linear layers of one forward of MODEL's shapes (every layer's own weights, so
     nothing stays in cache), for 1..16 rows: milliseconds per forward, kernel vs torch, and the
     weights' bytes over that time (GB/s). Also whether a product's first row has the bits it has
     alone (torch: not always; the kernel: by construction).
  2. forwards: a real forward of MODEL over a cached context (--context tokens) for 1..24 new
     tokens in one row (a decoding step, a verify pass of a drafted block), medians of --repeat
     forwards taken in turn across four configurations: torch's products and transformers' forward ("torch"); the kernel with
     transformers' forward ("kernel", nbdiff before the lean forward); the lean forward with its
     layers from Python ("lean-python": fewer calls, q/k/v and gate/up in one kernel call each);
     the lean forward with its layers in one C++ call over transformers' DynamicCache, which
     concatenates every layer's keys/values per token, its parameters read again every forward
     ("lean-cat", nbdiff before issue 31); the same over nbdiff's GrowingLayer cache, appended in
     place ("lean-room"); that with layers.cpp's fused elementwise loops ("lean-fused"); that with
     the parameters kept per model ("lean", what nbdiff runs). Each step is measured alone as the
     difference between neighbours in the same run. The cache is
     cropped back after each forward, so only the forward is timed (the cache update inside it
     included). The logits of both lean
     forwards must equal the kernel's bit for bit (last column).
  3. --breakdown: one one-token forward of each kernel configuration under torch.profiler: time in
     the products, in attention, in the other tensor operations, and the rest (Python: module
     calls, argument plumbing, mask and output building), and a streaming read of a 1 GiB tensor
     for the machine's bandwidth. In "lean" the products' share is the C++ call's own time
     (products plus its glue); the ATen operations it calls are counted apart, as from Python.

    python benchmarks/cpu_kernel.py ~/.cache/nbdiff/base-smollm2-135m --threads 2 --breakdown
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from nbdiff.hardware import cpu_name

CONFIGS = ("torch", "kernel", "lean-python", "lean-cat", "lean-room", "lean-fused", "lean")
LEAN = ("lean-python", "lean-cat", "lean-room", "lean-fused", "lean")
GROWING = ("lean-room", "lean-fused", "lean")  # the configurations over nbdiff's GrowingLayer cache


def timed(fn, repeat: int) -> float:
    """Median milliseconds of `repeat` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def products(model, rows: list[int], repeat: int, isa: int) -> list[dict]:
    from functools import partial

    from nbdiff.cpu_kernel import small_m_linear

    small_m_linear = partial(small_m_linear, isa=isa)

    weights = [m.weight.detach().clone() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    out = []
    for m in rows:
        xs = {w.shape[1]: torch.randn(m, w.shape[1]).to(w.dtype) for w in weights}
        torch_ms = timed(lambda: [torch.nn.functional.linear(xs[w.shape[1]], w) for w in weights], repeat)
        kernel_ms = timed(lambda: [small_m_linear(xs[w.shape[1]], w) for w in weights], repeat)
        # does the first row get the bits it gets alone? (every layer's product)
        same = {name: all(torch.equal(f(xs[w.shape[1]], w)[0], f(xs[w.shape[1]][:1], w)[0]) for w in weights)
                for name, f in (("torch", torch.nn.functional.linear), ("kernel", small_m_linear))}
        out.append({"rows": m, "torch_ms": round(torch_ms, 2), "kernel_ms": round(kernel_ms, 2),
                    "torch_gb_s": round(nbytes / torch_ms / 1e6, 1), "kernel_gb_s": round(nbytes / kernel_ms / 1e6, 1),
                    "torch_row_same_alone": same["torch"], "kernel_row_same_alone": same["kernel"]})
    return out


def configure(model, config: str, isa: int) -> None:
    """Put the model in one of CONFIGS (switching among the lean ones keeps the installed forward and its plan)."""
    from nbdiff.cpu_kernel import fast_forward, install, uninstall

    fast_forward.NATIVE = config in LEAN[1:]
    fast_forward.FUSED = config in ("lean-fused", "lean")
    fast_forward.KEEP_PLAN = config == "lean"
    if vars(model).get("_bench_config") in LEAN and config in LEAN:
        model._bench_config = config
        fast_forward._ready(model)  # "lean": the kept plan made here, outside the timed forward (once per install)
        return
    uninstall(model)
    model._bench_config = config
    if config == "torch":
        return
    install(model, fast_forward=False)
    for layer in model.modules():
        if hasattr(layer, "_isa"):
            layer._isa = isa
    if config in LEAN and not fast_forward.install(model):
        raise SystemExit("the lean forward does not take this model (see nbdiff/cpu_kernel/fast_forward.py)")
    if config in LEAN:
        fast_forward._ready(model)


def _cached(model, context: int, extra: int, configs, isa: int):
    """Token ids and, per configuration, a cache holding the first `context` of them: a DynamicCache that
    concatenates (transformers' own), or nbdiff's GrowingLayers that append in place (as decoding uses)."""
    from transformers import DynamicCache

    from nbdiff.decode.context import growing_cache

    ids = torch.randint(0, model.config.vocab_size, (1, context + extra))
    configure(model, "kernel", isa)
    plain, growing = DynamicCache(config=model.config), growing_cache(model.config)
    for cache in (plain, growing):
        model(input_ids=ids[:, :context], cache=cache, use_cache=True)
    return ids, {config: growing if config in GROWING else plain for config in configs}


def _step(model, ids, cache, context: int, m: int) -> torch.Tensor:
    """One forward of m new tokens over the cached context, then the cache cropped back (not timed apart:
    cropping is a slice)."""
    logits = model(input_ids=ids[:, context:context + m], position_ids=torch.arange(context, context + m)[None],
                   cache=cache, use_cache=True, logits_to_keep=0).logits
    cache.crop(-m)
    return logits[0]


@torch.no_grad()
def forwards(model, rows: list[int], repeat: int, context: int, isa: int, configs) -> list[dict]:
    ids, caches = _cached(model, context, max(rows), configs, isa)
    out = []
    for m in rows:
        row, logits, times = {"rows": m}, {}, {config: [] for config in configs}
        for config in configs:  # warm-up, and the logits to compare
            configure(model, config, isa)
            logits[config] = _step(model, ids, caches[config], context, m)
        for _ in range(repeat):  # the configurations in turn, one forward each: this machine's speed drifts
            for config in configs:
                configure(model, config, isa)
                start = time.perf_counter()
                _step(model, ids, caches[config], context, m)
                times[config].append(time.perf_counter() - start)
        for config in configs:
            row[f"{config}_ms"] = round(sorted(times[config])[repeat // 2] * 1e3, 2)
        if "torch" in logits and "kernel" in logits:
            row["max_logit_diff_kernel_vs_torch"] = float((logits["kernel"] - logits["torch"]).abs().max())
        if "kernel" in logits and any(c.startswith("lean") for c in logits):
            row["lean_same_bits_as_kernel"] = all(torch.equal(v, logits["kernel"]) for c, v in logits.items() if c.startswith("lean"))
        out.append(row)
    configure(model, "kernel", isa)
    return out


def streaming_gb_s(repeat: int = 5) -> float:
    """A plain read of 1 GiB (torch's sum over it, the machine's threads): the bandwidth a product could reach."""
    big = torch.ones(256 * 1024 * 1024)
    ms = timed(lambda: big.sum(), repeat)
    return round(big.numel() * 4 / ms / 1e6, 1)


@torch.no_grad()
def breakdown(model, context: int, repeat: int, isa: int) -> dict:
    """Where a one-token forward's time goes, per kernel configuration (torch.profiler's self times)."""
    from torch.profiler import ProfilerActivity, profile

    configs = ("kernel", *LEAN)
    ids, caches = _cached(model, context, 1, configs, isa)
    weights = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    groups = {"products": ("nbdiff::",), "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product")}
    out = {}
    for config in configs:
        configure(model, config, isa)
        cache = caches[config]
        wall = timed(lambda: _step(model, ids, cache, context, 1), repeat)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeat):
                _step(model, ids, cache, context, 1)
        ms = {name: 0.0 for name in (*groups, "other tensor ops")}
        calls = 0
        for event in prof.key_averages():
            name = next((g for g, keys in groups.items() if event.key.startswith(keys)), "other tensor ops")
            if event.key.startswith("aten::") or event.key.startswith("nbdiff::"):
                ms[name] += event.self_cpu_time_total / 1e3 / repeat
                calls += event.count
        # the crop after each forward is in the profile but not in the forward: negligible (a slice per layer)
        row = {"forward_ms": round(wall, 2), **{k: round(v, 2) for k, v in ms.items()}}
        row["python_and_rest_ms"] = round(wall - sum(ms.values()), 2)
        row["ops_per_forward"] = round(calls / repeat)
        row["products_gb_s"] = round(weights / ms["products"] / 1e6, 1) if ms["products"] else None
        out[config] = row
    configure(model, "kernel", isa)
    out["streaming_read_gb_s"] = streaming_gb_s()
    out["weights_mb"] = round(weights / 1e6, 1)
    return out


@torch.no_grad()
def lone_request(model, context: int, tokens: int, isa: int) -> dict:
    """Milliseconds per decoding step of one request alone (greedy, after a prompt of `context` tokens), taken in
    turn: the server's packed lane as before issue 31 (its GrowingLayer cache made it take the lean forward's
    Python layers), the packed lane now (C++ layers over the cache in place), and nbdiff's decoding context
    (CachedContext: `nbdiff generate` block 1), each stepping its own copy of the request."""
    from nbdiff.cpu_kernel import fast_forward
    from nbdiff.decode.context import CachedContext
    from nbdiff.decode.options import DecodeOptions
    from nbdiff.serve.packed import PackedLane

    configure(model, "lean", isa)
    prompt = torch.randint(0, model.config.vocab_size, (context,), generator=torch.Generator().manual_seed(0)).tolist()
    options = DecodeOptions(block_size=1, max_new_tokens=tokens + 2)
    lanes = {name: PackedLane(model, [prompt], [options], [0], eos_token_ids=[]) for name in ("packed-before", "packed")}
    ctx = CachedContext(model, [prompt])
    replies = {name: lane.run_block()[0].tokens for name, lane in lanes.items()}  # the prompt's forward
    replies["context"] = [int(ctx.prefill()[0].argmax())]

    def step(name):
        if name == "context":
            replies[name].append(int(ctx.commit(torch.tensor([replies[name][-1:]]))[0].argmax()))
        else:
            replies[name] += lanes[name].run_block()[0].tokens

    times = {name: [] for name in replies}
    for _ in range(tokens):
        for name in times:
            fast_forward.NATIVE = fast_forward.KEEP_PLAN = name != "packed-before"
            start = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - start)
    fast_forward.NATIVE = fast_forward.KEEP_PLAN = True
    out = {f"{name}_ms": round(sorted(t)[len(t) // 2] * 1e3, 2) for name, t in times.items()}
    out["same_tokens"] = replies["packed-before"] == replies["packed"] == replies["context"]
    out.update(context=context, tokens=tokens)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--rows", default="1,2,4,8,12,16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--context", type=int, default=64, help="cached tokens before the timed forward")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--isa", choices=["auto", "avx2"], default="auto",
                        help="avx2: run the AVX2 version even where AVX-512 is there (to see it on this CPU)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"forward configurations to time, of {', '.join(CONFIGS)} (lean: fp32 Llama/Qwen2 only)")
    parser.add_argument("--skip-products", action="store_true", help="only the model forwards (and --breakdown)")
    parser.add_argument("--breakdown", action="store_true", help="where a one-token forward's time goes (torch.profiler)")
    parser.add_argument("--lone-request", type=int, default=0, metavar="TOKENS",
                        help="also time TOKENS decoding steps of one request alone: the packed server lane before and "
                             "after issue 31 and nbdiff's decoding context, in turn")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from nbdiff.cpu_kernel import ISA_NAMES, status
    from nbdiff.loading import load_model

    os.environ["NBDIFF_CPU_KERNEL"] = "0"  # load plain; the benchmark switches the kernel itself
    model, _ = load_model(args.model, device="cpu", dtype=args.dtype)
    os.environ["NBDIFF_CPU_KERNEL"] = "1"
    state = status()
    if not state.ready:
        raise SystemExit(f"the kernel is {state.reason}")
    rows = [int(r) for r in args.rows.split(",")]
    configs = [c for c in args.configs.split(",") if c]
    if args.dtype != "fp32":
        configs = [c for c in configs if not c.startswith("lean")]
    isa = 1 if args.isa == "avx2" else state.isa
    report = {"cpu": cpu_name(), "threads": args.threads, "dtype": args.dtype, "torch": torch.__version__, "kernel": state.reason,
              "isa": ISA_NAMES[isa], "context": args.context,
              "products": [] if args.skip_products else products(model, rows, args.repeat, isa),
              "forwards": forwards(model, rows, args.repeat, args.context, isa, configs)}
    if args.breakdown and args.dtype == "fp32":
        report["breakdown"] = breakdown(model, args.context, args.repeat, isa)
    if args.lone_request and args.dtype == "fp32":
        report["lone_request"] = lone_request(model, args.context, args.lone_request, isa)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{report['cpu']}, {args.threads} threads, torch {torch.__version__}, kernel {state.reason}, running {report['isa']}, {args.dtype}")
    if report["products"]:
        print("products of one forward (ms, GB/s)  rows  torch          kernel         first row's bits as alone (torch / kernel)")
        for r in report["products"]:
            print(f"{'':36s}{r['rows']:4d} {r['torch_ms']:6.2f} {r['torch_gb_s']:5.1f}  {r['kernel_ms']:6.2f} {r['kernel_gb_s']:5.1f}"
                  f"   {r['torch_row_same_alone']} / {r['kernel_row_same_alone']}")
    print(f"model forward over {args.context} cached tokens (ms)  rows  " + "  ".join(f"{c:>11s}" for c in configs)
          + "  max |logit diff| kernel vs torch  lean's bits = kernel's")
    for r in report["forwards"]:
        print(f"{'':47s}{r['rows']:4d}  " + "  ".join(f"{r[c + '_ms']:11.2f}" for c in configs)
              + f"  {r.get('max_logit_diff_kernel_vs_torch', float('nan')):.1e}  {r.get('lean_same_bits_as_kernel', '')}")
    if "breakdown" in report:
        b = report["breakdown"]
        print(f"one-token forward, breakdown (ms; weights {b['weights_mb']} MB; a plain read of 1 GiB: {b['streaming_read_gb_s']} GB/s)")
        for config in ("kernel", *LEAN):
            r = b[config]
            print(f"  {config:11s} forward {r['forward_ms']:6.2f} = products {r['products']:6.2f} ({r['products_gb_s']} GB/s)"
                  f" + attention {r['attention']:5.2f} + other tensor ops {r['other tensor ops']:5.2f}"
                  f" + Python and the rest {r['python_and_rest_ms']:5.2f}  ({r['ops_per_forward']} ops)")
    if "lone_request" in report:
        r = report["lone_request"]
        print(f"one request alone, ms per decoding step after {r['context']} prompt tokens (median of {r['tokens']}):"
              f" packed lane before {r['packed-before_ms']:.2f}, packed lane {r['packed_ms']:.2f},"
              f" decoding context {r['context_ms']:.2f}; same tokens: {r['same_tokens']}")


if __name__ == "__main__":
    main()
