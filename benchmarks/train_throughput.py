"""Training throughput of the NBDiff layouts on CPU: one-pass 2L vs one forward per block vs plain AR.

    python benchmarks/train_throughput.py                 # ~10M Llama, seq 512, block 32, fp32
    python benchmarks/train_throughput.py --steps 3 --warmup 1 --layers 2   # quick look
    # the real SmolLM2 with LoRA r16: today's dense path vs the hidden-state path vs plain AR
    python benchmarks/train_throughput.py --model /work/models/smollm2-nbdiff --lora-rank 16 \
        --batch-size 8 --seq-len 256 --block-size 8 --steps 2 --warmup 1 \
        --methods 2L-dense@fp32,2L@fp32,2L@bf16,ar@fp32,ar@bf16

Methods (same model, same batch, same losses, each step = forward + backward + AdamW step); a
method may carry `@fp32` / `@bf16` (bf16 = autocast over fp32 master weights, as `adapt` does) and
`+ckpt` (gradient checkpointing):
- `2L-dense`: `nbdiff.method.layout.parallel_forward` over `[x_t ; x_0]` (2L tokens, one pass), full
  logits [B, 2L, V], then L_MDM + 0.5 L_AR (the path before issue 14).
- `2L`: `nbdiff.method.layout.parallel_losses`: the same pass returns hidden states; only the rows the
  losses read go through the LM head, in chunks (no [B, 2L, V] tensor).
- `per-block`: the naive loop. For block k: one forward of `[x_0 blocks < k ; x_t block k]` under
  `nbdiff.method.masks.decoding_mask` (the context-causal mask the decoder uses), L_MDM on block k,
  backward at once (so activations of one block at a time are alive); plus one causal AR forward of
  x_0 for L_AR. Blocks without a masked token are skipped (nothing to learn there).
- `ar`: plain AR fine-tuning (causal forward of x_0, next-token loss on full logits, as the
  transformers `labels=` path does).
Throughput counts training tokens: batch * L per step, for every method.

Each method runs in its own subprocess, so its peak RSS (ru_maxrss) is its own. Before timing,
the script checks on one batch that `2L` and `per-block` give the same loss and gradients.

Feeds docs/benchmarks/training.md, section "Training efficiency: one-pass 2L layout vs one forward per block vs plain AR",
and docs/benchmarks/adaptation.md, section "Adaptation cost (issue 14)".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

METHODS = ("2L-dense", "2L", "per-block", "ar")
AR_WEIGHT = 0.5


def build(args):
    from nbdiff.testing import tiny_model

    torch.manual_seed(args.seed)
    if args.model:
        return build_real(args)
    model = tiny_model(
        "llama", seed=args.seed, vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(1024, args.seq_len),
    )
    return model.train()


def build_real(args):
    """A converted model folder, fp32 master weights, optionally LoRA on every linear layer (+ mask row)."""
    from transformers import AutoModelForCausalLM

    from nbdiff.method.settings import read_settings

    # as `nbdiff adapt` does: LoRA under bf16 autocast keeps the frozen base in bf16, adapters in fp32
    base = torch.bfloat16 if args.lora_rank and getattr(args, "dtype", "fp32") == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=base, attn_implementation="sdpa")
    model.config.use_cache = False
    args.vocab = model.config.vocab_size
    args.mask_id = read_settings(args.model).mask_token_id
    if args.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                 target_modules="all-linear", trainable_token_indices=[args.mask_id],
                                                 task_type="CAUSAL_LM"))
    return model.train()


def batch(args, step: int):
    """A random batch (token ids are random: throughput does not depend on them) and its noise."""
    from nbdiff.method.noising import noise_blocks

    g = torch.Generator().manual_seed(1000 + step)
    B, L = args.batch_size, args.seq_len
    mask_id = getattr(args, "mask_id", args.vocab - 1)
    x0 = torch.randint(0, min(args.vocab, mask_id), (B, L), generator=g)  # [B, L], never the mask id
    pos = torch.arange(L).expand(B, L)
    doc = torch.zeros(B, L, dtype=torch.long)
    noised = noise_blocks(x0, pos, doc, args.block_size, mask_id, generator=g)
    return x0, pos, doc, noised


def ar_targets(pos: torch.Tensor) -> torch.Tensor:
    """Every position except a document start is an AR target ([B, L] bool)."""
    return pos > 0


def step_2l(model, args, x0, pos, doc, noised, backward=True):
    """The hidden-state path (issue 14): no full logits."""
    from nbdiff.method.layout import parallel_losses

    parts = parallel_losses(model, noised.x_t, x0, pos, doc, noised.masked, noised.t, ar_targets(pos),
                            args.block_size, "causal", ar_weight=AR_WEIGHT)
    if backward:
        parts.total.backward()
    return parts.total.item(), parts.mdm.item(), parts.ar.item()


def step_2l_dense(model, args, x0, pos, doc, noised, backward=True):
    from nbdiff.method.layout import parallel_forward
    from nbdiff.method.losses import ar_loss, combine, mdm_loss

    noised_logits, clean_logits = parallel_forward(model, noised.x_t, x0, pos, doc, args.block_size, "causal")
    mdm, _, _ = mdm_loss(noised_logits, x0, noised.masked, noised.t)
    ar, _ = ar_loss(clean_logits, x0, ar_targets(pos))
    total = combine(mdm, ar, AR_WEIGHT)
    if backward:
        total.backward()
    return total.item(), mdm.item(), ar.item()


def step_per_block(model, args, x0, pos, doc, noised, backward=True):
    """One forward per block; each block's CE sum is divided by the batch's total masked count so
    the summed loss equals the mean L_MDM of the 2L layout exactly."""
    import torch.nn.functional as F

    from nbdiff.method.masks import decoding_mask, to_model_mask

    B, L = x0.shape
    b = args.block_size
    n_masked = int(noised.masked[:, 1:].sum())
    mdm_total = 0.0
    for k in range(L // b):
        lo, hi = k * b, (k + 1) * b
        sel = noised.masked[:, lo + 1 : hi]  # [B, b-1] targets inside block k (its first token is never masked)
        if not sel.any():
            continue
        ids = torch.cat([x0[:, :lo], noised.x_t[:, lo:hi]], dim=1)  # [B, lo + b]
        mask = to_model_mask(decoding_mask(lo, b), model).expand(B, -1, -1, -1)
        logits = model(input_ids=ids, position_ids=pos[:, :hi], attention_mask=mask, use_cache=False).logits
        pred = logits[:, lo : hi - 1][sel]  # logits at j-1 predict token j, j in block k
        gold = x0[:, lo + 1 : hi][sel]
        loss_k = F.cross_entropy(pred.float(), gold, reduction="sum") / n_masked
        if backward:
            loss_k.backward()
        mdm_total += loss_k.item()
    # L_AR: one causal forward of the clean sequence
    logits = model(input_ids=x0, position_ids=pos, use_cache=False).logits
    ar = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x0[:, 1:].reshape(-1))
    if backward:
        (AR_WEIGHT * ar).backward()
    return mdm_total + AR_WEIGHT * ar.item(), mdm_total, ar.item()


def step_ar(model, args, x0, pos, doc, noised, backward=True):
    import torch.nn.functional as F

    logits = model(input_ids=x0, use_cache=False).logits
    ar = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x0[:, 1:].reshape(-1))
    if backward:
        ar.backward()
    return ar.item(), 0.0, ar.item()


STEP = {"2L-dense": step_2l_dense, "2L": step_2l, "per-block": step_per_block, "ar": step_ar}


def parse_method(spec: str) -> tuple[str, str, bool]:
    """'2L@bf16+ckpt' -> ('2L', 'bf16', True)."""
    ckpt = spec.endswith("+ckpt")
    name, _, dtype = spec.removesuffix("+ckpt").partition("@")
    if name not in METHODS or dtype not in ("", "fp32", "bf16"):
        raise SystemExit(f"unknown method {spec!r}: use one of {METHODS}, optionally @fp32/@bf16 and +ckpt")
    return name, dtype or "fp32", ckpt


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args) -> dict:
    """Time one method; runs in its own process."""
    from contextlib import nullcontext

    torch.set_num_threads(args.threads)
    spec = args.worker
    args.worker, dtype, args.ckpt = parse_method(spec)
    args.dtype = dtype
    model = build(args)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bf16" else nullcontext
    rss_before = rss_mb()
    times, cpu, losses = [], [], []
    for step in range(args.warmup + args.steps):
        x0, pos, doc, noised = batch(args, step)
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast():
            loss = STEP[args.worker](model, args, x0, pos, doc, noised)
        losses.append(loss[0])
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if step >= args.warmup:
            times.append(dt)
            cpu.append(dc)
    med = statistics.median(times)
    # CPU seconds (all threads) per step: less sensitive than wall time to other jobs on a shared machine
    cpu_med = statistics.median(cpu)
    return {
        "method": spec, "losses": losses, "median_step_s": med, "min_step_s": min(times), "max_step_s": max(times),
        "median_cpu_s": cpu_med, "tokens_per_cpu_s": args.batch_size * args.seq_len / cpu_med,
        "load_avg_1min": os.getloadavg()[0],
        "tokens_per_s": args.batch_size * args.seq_len / med,
        "rss_before_mb": rss_before, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params": sum(p.numel() for p in model.parameters()),
    }


def check(args) -> dict:
    """Same batch, same weights: the 2L loss/gradients vs the per-block loop's."""
    torch.set_num_threads(args.threads)
    args.ckpt = False
    model = build(args)
    x0, pos, doc, noised = batch(args, 0)
    grads = {}
    for name in args.check:
        model.zero_grad(set_to_none=True)
        total, mdm, ar = STEP[name](model, args, x0, pos, doc, noised)
        g = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        grads[name] = {"total": total, "mdm": mdm, "ar": ar, "grad": g}
    (na, a), (nb, b) = grads.items()
    return {
        "compared": f"{na} vs {nb}", "loss_a": a["total"], "loss_b": b["total"], "mdm_a": a["mdm"],
        "mdm_b": b["mdm"], "ar_a": a["ar"], "ar_b": b["ar"], "abs_loss_diff": abs(a["total"] - b["total"]),
        "grad_max_abs_diff": (a["grad"] - b["grad"]).abs().max().item(),
        "grad_max_abs": a["grad"].abs().max().item(),
        "grad_cosine": torch.nn.functional.cosine_similarity(a["grad"].double(), b["grad"].double(), dim=0).item(),
        "masked_tokens": int(noised.masked.sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--model", help="a converted model folder instead of the random tiny Llama")
    ap.add_argument("--lora-rank", type=int, default=0, help="LoRA on every linear layer (with --model)")
    ap.add_argument("--check", default="2L,2L-dense", help="two methods whose loss and gradients are compared")
    ap.add_argument("--no-check", action="store_true", help="skip the equivalence check")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--check-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.check = args.check.split(",")
    if args.seq_len % args.block_size:
        ap.error("--seq-len must be a multiple of --block-size")

    if args.worker:
        print(json.dumps(worker(args)))
        return
    passthrough = [a for a in sys.argv[1:] if not a.startswith("--json") and not a.endswith(".json")]
    # the equivalence check runs in its own process too, so it does not inflate any peak RSS
    if args.check_only:
        print(json.dumps(check(args)))
        return
    check_res = None
    if not args.no_check:
        chk = subprocess.run([sys.executable, __file__, *passthrough, "--check-only"], capture_output=True, text=True)
        if chk.returncode:
            sys.exit(chk.stderr)
        check_res = json.loads(chk.stdout.strip().splitlines()[-1])
        print("equivalence check (same batch, same weights, fp32):", json.dumps(check_res), flush=True)
    results = []
    for m in args.methods.split(","):
        r = subprocess.run([sys.executable, __file__, *passthrough, "--worker", m], capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr)
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    def ar_of(r):  # plain AR in the same dtype (the fair reference), else the first AR row
        same = [a for a in results if a["method"].split("+")[0] == "ar@" + r["method"].split("@")[-1].split("+")[0]]
        return (same or [a for a in results if a["method"].startswith("ar")] or [None])[0]

    first = results[0]
    name = args.model or "random Llama"
    lora = f", LoRA r{args.lora_rank}" if args.lora_rank else ""
    print(f"\nmodel: {name} {first['params'] / 1e6:.2f}M params{lora}, seq {args.seq_len}, block {args.block_size}, "
          f"batch {args.batch_size}, {args.threads} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print("| method | median step (s) | tokens/s (wall) | CPU s/step | tokens/CPU-s | vs first row (CPU) "
          "| vs AR (CPU) | peak RSS (MB) | RSS vs AR | load avg | losses |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        base = ar_of(r)
        rel = f"{r['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:.2f}x" if base else "-"
        mem = f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x" if base else "-"
        print(f"| {r['method']} | {r['median_step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['median_cpu_s']:.2f} | "
              f"{r['tokens_per_cpu_s']:.0f} | {r['tokens_per_cpu_s'] / first['tokens_per_cpu_s']:.2f}x | {rel} | "
              f"{r['peak_rss_mb']:.0f} | {mem} | {r['load_avg_1min']:.1f} | "
              f"{' '.join(f'{x:.3f}' for x in r['losses'])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "check": check_res, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
