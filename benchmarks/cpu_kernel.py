"""The small-row CPU kernel (nbdiff/cpu_kernel) against torch's fp32 product, on this CPU.

Two measurements, both with cold caches the way decoding sees them:
  1. products: the linear layers of one forward of MODEL's shapes (every layer's own weights, so
     nothing stays in cache), for 1..16 rows: milliseconds per forward, kernel vs torch.
     Also whether a product's first row has the bits it has alone (torch: not always; the kernel:
     by construction).
  2. model: a real forward of MODEL over a cached context for 1..24 new tokens in one row (a
     decoding step, a verify pass of a drafted block), kernel installed vs not, and the largest
     difference of the first token's logits between the two.

    python benchmarks/cpu_kernel.py ~/.cache/nbdiff/base-smollm2-135m --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from nbdiff.hardware import cpu_name


def timed(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e3


def products(model, rows: list[int], repeat: int, isa: int) -> list[dict]:
    from functools import partial

    from nbdiff.cpu_kernel import small_m_linear

    small_m_linear = partial(small_m_linear, isa=isa)

    weights = [m.weight.detach().clone() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    out = []
    for m in rows:
        xs = {w.shape[1]: torch.randn(m, w.shape[1]).to(w.dtype) for w in weights}
        torch_ms = timed(lambda: [torch.nn.functional.linear(xs[w.shape[1]], w) for w in weights], repeat)
        kernel_ms = timed(lambda: [small_m_linear(xs[w.shape[1]], w) for w in weights], repeat)
        # does the first row get the bits it gets alone? (every layer's product)
        same = {name: all(torch.equal(f(xs[w.shape[1]], w)[0], f(xs[w.shape[1]][:1], w)[0]) for w in weights)
                for name, f in (("torch", torch.nn.functional.linear), ("kernel", small_m_linear))}
        out.append({"rows": m, "torch_ms": round(torch_ms, 2), "kernel_ms": round(kernel_ms, 2),
                    "torch_row_same_alone": same["torch"], "kernel_row_same_alone": same["kernel"]})
    return out


@torch.inference_mode()
def forwards(model, rows: list[int], repeat: int, context: int, isa: int) -> list[dict]:
    from transformers import DynamicCache

    from nbdiff.cpu_kernel import install, uninstall

    ids = torch.randint(0, model.config.vocab_size, (1, context + max(rows)))
    base = DynamicCache()
    model(ids[:, :context], past_key_values=base, use_cache=True)
    out = []

    def step(m):
        cache = DynamicCache()
        for i, layer in enumerate(base.layers):
            cache.update(layer.keys.clone(), layer.values.clone(), i)
        return model(ids[:, context:context + m], past_key_values=cache, use_cache=True).logits[0, 0]

    for m in rows:
        uninstall(model)
        torch_ms, ref = timed(lambda: step(m), repeat), step(m)
        install(model)
        for layer in model.modules():
            if hasattr(layer, "_isa"):
                layer._isa = isa
        kernel_ms, got = timed(lambda: step(m), repeat), step(m)
        out.append({"rows": m, "torch_ms": round(torch_ms, 2), "kernel_ms": round(kernel_ms, 2),
                    "max_logit_diff_vs_torch": float((got - ref).abs().max())})
    uninstall(model)
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
    isa = 1 if args.isa == "avx2" else state.isa
    report = {"cpu": cpu_name(), "threads": args.threads, "dtype": args.dtype, "torch": torch.__version__, "kernel": state.reason,
              "isa": ISA_NAMES[isa],
              "products": products(model, rows, args.repeat, isa), "forwards": forwards(model, rows, args.repeat, args.context, isa)}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{report['cpu']}, {args.threads} threads, torch {torch.__version__}, kernel {state.reason}, running {report['isa']}, {args.dtype}")
    print("products of one forward (ms)  rows  torch  kernel  first row's bits as alone (torch / kernel)")
    for r in report["products"]:
        print(f"{'':30s}{r['rows']:4d} {r['torch_ms']:6.2f} {r['kernel_ms']:7.2f}  {r['torch_row_same_alone']} / {r['kernel_row_same_alone']}")
    print("model forward over a cached context (ms)  rows  torch  kernel  max |logit diff|")
    for r in report["forwards"]:
        print(f"{'':42s}{r['rows']:4d} {r['torch_ms']:6.2f} {r['kernel_ms']:7.2f}  {r['max_logit_diff_vs_torch']:.1e}")


if __name__ == "__main__":
    main()
