"""The trained drafter's learning curve and training throughput (docs/benchmarks/drafter.md, "Trained drafter (CPU)").

Tokens per verify come from step-by-step simulated greedy decoding along the AR model's own replies
to novel held-out prompts (nbdiff.drafter.train.simulated_tokens_per_verify: the first reply token
from the prefill, then per verify the accepted drafts plus AR's token), never from an average over
every position. `--real N` decodes N of the prompts for real (exact mode with the drafter) as a check.

    # tokens per verify of prompt lookup on the same replies (no model forward needed)
    python benchmarks/drafter_curve.py lookup --model M --heldout heldout-replies.jsonl
    # a finished drafter at blocks 8 and 16 (and real decoding of 8 prompts as a check)
    python benchmarks/drafter_curve.py eval --model M --drafter RUN --heldout heldout-replies.jsonl --real 8
    # the curve: every evaluation of one or more `nbdiff adapt --target drafter` runs
    python benchmarks/drafter_curve.py table RUN1 RUN2 ...
    # training throughput (targets/s) with each efficiency measure added in turn
    python benchmarks/drafter_curve.py throughput --model M --data replies.jsonl --out /tmp/tp
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def heldout_rows(tokenizer, path: str, max_len: int = 512):
    from nbdiff.adapt.data import load_corpus
    from nbdiff.drafter.data import document_rows

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return document_rows(load_corpus([path], tokenizer), pad, max_len=max_len)


def cmd_lookup(args) -> None:
    from transformers import AutoTokenizer

    from nbdiff.drafter.train import lookup_accepts, simulated_tokens_per_verify

    rows = heldout_rows(AutoTokenizer.from_pretrained(args.model), args.heldout)
    for b in args.block_sizes:
        tpv, tokens, verifies = simulated_tokens_per_verify(lookup_accepts(rows, b)[0], rows)
        print(json.dumps({"drafter": "prompt lookup (n<=3)", "block_size": b, "tokens_per_verify": round(tpv, 3),
                          "tokens": tokens, "verifies": verifies, "replies": len(rows)}))


def cmd_eval(args) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nbdiff.drafter.folder import load_drafter
    from nbdiff.drafter.train import (DrafterTraining, accepted_drafts, lookup_accepts, lookup_first,
                                      simulated_tokens_per_verify)

    tok = AutoTokenizer.from_pretrained(args.model)
    ar = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    module = DrafterTraining(load_drafter(args.drafter, ar), ar)
    rows = heldout_rows(tok, args.heldout)
    for b in args.block_sizes:
        t0 = time.perf_counter()
        drafts = accepted_drafts(module, rows, b)
        tpv, tokens, verifies = simulated_tokens_per_verify(drafts, rows)
        lookup, matched = lookup_accepts(rows, b)
        combined, _, _ = simulated_tokens_per_verify(lookup_first(drafts, lookup, matched), rows)  # lookup+DIR
        print(json.dumps({"drafter": str(args.drafter), "block_size": b, "tokens_per_verify": round(tpv, 3),
                          "lookup_first_tokens_per_verify": round(combined, 3), "tokens": tokens,
                          "verifies": verifies, "replies": len(rows), "seconds": round(time.perf_counter() - t0, 1)}))
    if args.real:
        real_decoding(ar, tok, args, rows)


def real_decoding(ar, tok, args, rows) -> None:
    """Exact mode with the drafter (whole blocks verified) on the first N held-out prompts, beside the
    simulated walk along the same N replies: the two should agree (the AR reply is the greedy one)."""
    import nbdiff
    from nbdiff.drafter.folder import load_drafter
    from nbdiff.drafter.train import DrafterTraining, accepted_drafts, simulated_tokens_per_verify

    records = [json.loads(line) for line in Path(args.heldout).read_text(encoding="utf-8").splitlines()[: args.real]]
    first = type(rows)(*(getattr(rows, f)[: args.real] for f in ("input_ids", "position_ids", "doc_ids", "trainable")))
    module = DrafterTraining(load_drafter(args.drafter, ar), ar)
    for b in args.block_sizes:
        tokens = verifies = 0
        for rec in records:
            _, final = nbdiff.generate(ar, tok, rec["messages"][:-1], block_size=b, exact=True, drafter=str(args.drafter),
                                       draft_threshold=0.0, max_new_tokens=args.max_new_tokens)
            tokens += final.accepted_length * final.verified_blocks  # per block: its first token + accepted drafts
            verifies += final.verified_blocks
        simulated, _, _ = simulated_tokens_per_verify(accepted_drafts(module, first, b), first)
        print(json.dumps({"drafter": str(args.drafter), "block_size": b, "prompts": len(records),
                          "real_tokens_per_verify": round(tokens / max(verifies, 1), 3), "real_verifies": verifies,
                          "simulated_tokens_per_verify": round(simulated, 3)}))


def _lines(path: Path) -> int:
    """Records in a JSON-lines data file, gzipped or not."""
    from nbdiff.adapt.data import open_lines

    with open_lines(path) as f:
        return sum(1 for line in f if line.strip())


def cmd_table(args) -> None:
    """One markdown row per evaluation of each run: replies, targets, minutes, tokens per verify (the
    drafter alone at every evaluated block, and lookup first at block 8), held-out loss."""
    import yaml

    from nbdiff.adapt.data import expand_paths

    print("| run | distinct replies | step | drafted targets | training minutes | tokens per verify, block 8 | "
          "block 16 | lookup first, block 8 | held-out loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        recs = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
        data = yaml.safe_load((Path(run) / "recipe.yaml").read_text())["data"]
        replies = sum(_lines(f) for f in expand_paths(data))
        trains = {r["step"]: r for r in recs if r["event"] == "train"}
        for ev in (r for r in recs if r["event"] == "eval"):
            tr = trains.get(ev["step"], {})
            tpv = ev["tokens_per_verify"]
            cell = lambda d, b: f"{d[b]:.3f}" if b in d else "-"  # noqa: E731
            print(f"| {Path(run).name} | {replies} | {ev['step']} | {tr.get('tokens', 0):,} | "
                  f"{tr.get('elapsed', 0) / 60:.1f} | {cell(tpv, '8')} | {cell(tpv, '16')} | "
                  f"{cell(ev.get('lookup_first_tokens_per_verify', {}), '8')} | {ev['mdm'][str(ev['block_size'])]:.3f} |")


THROUGHPUT = [
    ("baseline: whole vocabulary, fp32, AR forward every step", ["--dtype", "fp32"]),
    ("+ draft vocabulary 4096", ["--dtype", "fp32", "--drafter-vocab", "4096"]),
    ("+ bf16 autocast (native here)", ["--dtype", "auto", "--drafter-vocab", "4096"]),
    ("+ features cached on disk (2nd epoch)", ["--dtype", "auto", "--drafter-vocab", "4096", "--drafter-cache-features"]),
]


def cmd_throughput(args) -> None:
    """Short runs on a small data file, each measure added in turn; targets/s over the second half of the steps."""
    for name, flags in THROUGHPUT:
        out = Path(args.out) / name.split(":")[0].replace(" ", "_").replace("+", "p")
        cmd = [sys.executable, "-m", "nbdiff_cli.app", "adapt", args.model, "--data", args.data, "--out", str(out),
               "--force", "--target", "drafter", "--block-size", "16", "--seq-len", str(args.seq_len), "--steps",
               str(args.steps), "--batch-size", "1", "--drafter-anchors", "48", "--eval-fraction", "0",
               "--log-every", "1", "--lr", "6e-4", *flags]
        subprocess.run(cmd, check=True, capture_output=True)
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        second = [r for r in recs if r["event"] == "train" and r["step"] > args.steps // 2]
        targets = second[-1]["tokens"] - [r for r in recs if r["event"] == "train"][args.steps // 2 - 1]["tokens"]
        seconds = sum(r["step_seconds"] for r in second)
        print(json.dumps({"setting": name, "targets_per_s": round(targets / seconds, 1),
                          "step_s": round(seconds / len(second), 2), "steps_timed": len(second)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("lookup", "eval"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True)
        p.add_argument("--heldout", required=True)
        p.add_argument("--block-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16])
        if name == "eval":
            p.add_argument("--drafter", required=True)
            p.add_argument("--real", type=int, default=0)
            p.add_argument("--max-new-tokens", type=int, default=128)
    p = sub.add_parser("table")
    p.add_argument("runs", nargs="+")
    p = sub.add_parser("throughput")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    {"lookup": cmd_lookup, "eval": cmd_eval, "table": cmd_table, "throughput": cmd_throughput}[args.cmd](args)


if __name__ == "__main__":
    main()
