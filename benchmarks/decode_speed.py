"""Decoding speed: transformers generate() vs the nbdiff decoder at several block sizes, side by side.

    python benchmarks/decode_speed.py /work/models/smollm2-nbdiff --max-new-tokens 64
    python benchmarks/decode_speed.py MODEL --quant            # weight memory and tokens/s: fp32, bf16, nf4

Every method decodes the same chat prompts (prose, list, code, arithmetic) to exactly
--max-new-tokens tokens (EOS is ignored by every method, so all runs produce the same number of
tokens and the rates compare like for like). Greedy; nbdiff uses threshold --threshold.
Prints a Markdown table; --json writes the raw figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

PROMPTS = {
    "prose": "Write a short paragraph about the sea.",
    "list": "List five fruits, one per line.",
    "code": "Write a Python function that reverses a string.",
    "arithmetic": "What is 17 times 23? Explain step by step.",
}


def encode_all(tokenizer):
    from nbdiff.api import encode

    return [encode(tokenizer, text) for text in PROMPTS.values()]


def run_generate(model, prompts, max_new_tokens):
    tokens = seconds = forwards = 0
    for ids in prompts:
        x = torch.tensor([ids], device=model.device)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                do_sample=False, eos_token_id=None, pad_token_id=0,
            )
        seconds += time.perf_counter() - start
        new = out.shape[1] - x.shape[1]
        tokens += new
        forwards += new  # one forward per token (prefill gives the first)
    return dict(tokens=tokens, seconds=seconds, forwards=forwards)


def run_nbdiff(model, prompts, max_new_tokens, block_size, threshold, mask_token_id):
    from nbdiff.decoder import decode
    from nbdiff.decoding import DecodeOptions

    opts = DecodeOptions(block_size=block_size, threshold=threshold, max_new_tokens=max_new_tokens)
    tokens = seconds = forwards = 0
    for ids in prompts:
        final = list(decode(model, [ids], opts, mask_token_id=mask_token_id, eos_token_ids=[]))[-1]
        tokens += final.new_tokens
        seconds += final.seconds
        forwards += final.forwards
    return dict(tokens=tokens, seconds=seconds, forwards=forwards)


def row(name, b, r):
    return f"| {name} | {b} | {r['tokens']} | {r['forwards']} | {r['tokens'] / r['forwards']:.2f} | {r['tokens'] / r['seconds']:.1f} |"


def speed_table(args):
    from nbdiff.api import load
    from nbdiff.loading import model_settings

    torch.set_num_threads(args.threads)
    model, tok = load(args.model, device="cpu", dtype="fp32")
    prompts = encode_all(tok)
    mask = model_settings(model).mask_token_id
    run_nbdiff(model, prompts[:1], 8, 4, args.threshold, mask)  # warm-up
    results = {"generate": run_generate(model, prompts, args.max_new_tokens)}
    for b in args.block_sizes:
        results[f"nbdiff b={b}"] = run_nbdiff(model, prompts, args.max_new_tokens, b, args.threshold, mask)
    lines = ["| method | block size | tokens | forwards | tokens/forward | tokens/s |", "|---|---|---|---|---|---|"]
    lines.append(row("transformers generate()", 1, results["generate"]))
    for b in args.block_sizes:
        lines.append(row(f"nbdiff (threshold {args.threshold})", b, results[f"nbdiff b={b}"]))
    return lines, results


def quant_table(args):
    from nbdiff.api import load
    from nbdiff.loading import model_settings
    from nbdiff.quantize import weight_bytes

    torch.set_num_threads(args.threads)
    lines = ["| weights | weight memory (MiB) | block size | tokens/forward | tokens/s |", "|---|---|---|---|---|"]
    results = {}
    for name, dtype, quant in (("fp32", "fp32", None), ("bf16", "bf16", None), ("nf4 (fp32 compute)", "fp32", "nf4")):
        model, tok = load(args.model, device="cpu", dtype=dtype, quantize=quant)
        prompts = encode_all(tok)
        mask = model_settings(model).mask_token_id
        mib = weight_bytes(model) / 2**20
        run_nbdiff(model, prompts[:1], 4, 1, args.threshold, mask)  # warm-up
        for b in args.quant_block_sizes:
            r = run_nbdiff(model, prompts, args.max_new_tokens, b, args.threshold, mask)
            results[f"{name} b={b}"] = dict(r, weight_mib=mib)
            lines.append(f"| {name} | {mib:.0f} | {b} | {r['tokens'] / r['forwards']:.2f} | {r['tokens'] / r['seconds']:.1f} |")
        del model
    return lines, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[1, 4, 8, 32])
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quant", action="store_true", help="fp32 / bf16 / nf4 table instead of the speed table")
    parser.add_argument("--quant-block-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--json", help="write raw figures here")
    args = parser.parse_args()
    lines, results = quant_table(args) if args.quant else speed_table(args)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, {args.threads} threads")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
