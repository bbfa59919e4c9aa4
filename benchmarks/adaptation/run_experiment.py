"""The paper's central claim at small scale: adapt a tiny AR model with `nbdiff adapt`, then compare
held-out MDM loss (block sizes 2, 4, 8) and AR loss (block size 1) before and after.

    python benchmarks/adaptation/run_experiment.py convert             # tiny-ar -> tiny-ar-nbdiff
    python benchmarks/adaptation/run_experiment.py adapt --parallel 2  # the four variants, via the CLI
    python benchmarks/adaptation/run_experiment.py evaluate            # held-out table -> results.json
    python benchmarks/adaptation/run_experiment.py decode              # a few held-out prompts, b = 4 and 8
    python benchmarks/adaptation/run_experiment.py plot                # nbdiff plot for every run
    python benchmarks/adaptation/run_experiment.py compare             # docs/adaptation-<runs>.png, all runs
    python benchmarks/adaptation/run_experiment.py leak                # block-causal L_AR sees its own block

Variants (all from the converted source, same data order, same steps, same seed):
- nbdiff:       M_CC (token-causal clean copy) + AR loss (lambda 0.5), curriculum 1,2,4,8
- no-ar-loss:   the same with --ar-loss-weight 0
- block-causal: the same with --context-mask block-causal (BD3-LM's clean copy)
- ar-control:   plain AR fine-tuning, same steps (--block-size 1 --curriculum none): the fair
                reference for "the AR loss stays within 5%" (fine-tuning alone moves it too)

Evaluation: held-out chapters (never trained on), packed by nbdiff.adapt.data exactly as training rows,
scored by nbdiff.adapt.evaluation.evaluate, whose noise is seeded per (block size, row): every model sees
the same masks. AR loss = block size 1 with the causal mask for every model.

Feeds docs/benchmarks/central-claim.md, section "The central claim at small scale".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path("/work/runs/adaptation")
VARIANTS = {
    "nbdiff": {},
    "no-ar-loss": {"--ar-loss-weight": "0"},
    "block-causal": {"--context-mask": "block-causal"},
    "ar-control": {"--block-size": "1", "--curriculum": "none"},
}
PROMPTS = 3  # held-out prompts decoded per model


def source_dir(root: Path) -> Path:
    return root / "tiny-ar-nbdiff"


RUNS = "runs"  # set from --runs: a second set of runs (e.g. longer) lives beside the first


def run_dir(root: Path, name: str) -> Path:
    return root / RUNS / name


def adapt_command(args, name: str) -> list[str]:
    opts = {
        "--data": str(args.root / "data" / "train.jsonl"),
        "--out": str(run_dir(args.root, name)),
        "--steps": str(args.steps),
        "--seq-len": str(args.seq_len),
        "--batch-size": str(args.batch_size),
        "--lr": str(args.lr),
        "--warmup-steps": str(max(1, args.steps // 20)),
        "--block-size": "8",
        "--curriculum": "1,2,4,8",
        "--growth-steps": str(int(args.steps * 0.6)),
        "--ar-loss-weight": "0.5",
        "--context-mask": "causal",
        "--eval-every": str(max(1, args.steps // 4)),
        "--cache-dir": str(args.root / "data-cache"),
        "--device": "cpu",
        "--seed": "0",
    }
    opts.update(VARIANTS[name])
    cmd = ["nbdiff", "adapt", str(source_dir(args.root))]
    for k, v in opts.items():
        cmd += [k, v]
    return cmd + ["--force"]


def cmd_convert(args) -> None:
    cmd = ["nbdiff", "convert", str(args.root / "tiny-ar"), "--out", str(source_dir(args.root)), "--block-size", "8",
           "--force"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def cmd_adapt(args) -> None:
    """Run the variants through the CLI, `--parallel` at a time (each with --threads torch threads)."""
    names = args.variants.split(",")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    (args.root / "logs").mkdir(parents=True, exist_ok=True)
    pending, running, timing = list(names), {}, {}
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            cmd = adapt_command(args, name)
            print("$", " ".join(cmd), flush=True)
            log = open(args.root / "logs" / f"adapt-{RUNS}-{name}.log", "w")
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time(), cmd)
        time.sleep(5)
        for name, (proc, t0, cmd) in list(running.items()):
            if proc.poll() is not None:
                timing[name] = {"wall_s": round(time.time() - t0, 1), "rc": proc.returncode, "command": " ".join(cmd),
                                "threads": args.threads, "parallel": args.parallel}
                print(name, timing[name], flush=True)
                del running[name]
    path = args.root / f"adapt_timing-{RUNS}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    old.update(timing)
    path.write_text(json.dumps(old, indent=2))


def heldout_rows(args, tokenizer):
    from nbdiff.adapt.data import build_dataset

    ds = build_dataset([args.root / "data" / "heldout.jsonl"], tokenizer, args.seq_len, seed=0, eval_fraction=0.0,
                       cache_dir=args.root / "data-cache")
    return ds.train.select(slice(0, args.eval_rows))


def load(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nbdiff.method.settings import read_settings

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(path), read_settings(path)


def models(args) -> dict[str, Path]:
    out = {"source": source_dir(args.root)}
    for name in VARIANTS:
        if (run_dir(args.root, name) / "config.json").is_file():
            out[name] = run_dir(args.root, name)
    return out


def cmd_evaluate(args) -> None:
    import torch

    from nbdiff.adapt.evaluation import evaluate

    torch.set_num_threads(args.threads)
    results = {}
    rows = None
    for name, path in models(args).items():
        t0 = time.time()
        model, tok, settings = load(path)
        if rows is None:
            rows = heldout_rows(args, tok)
        res = {"path": str(path), "context_mask": settings.context_mask,
               "adapted_block_size": settings.adapted_block_size}
        # every model: AR at b=1 and MDM at 2,4,8 with the causal (NBDiff) clean context
        ev = evaluate(model, rows, [1, 2, 4, 8], settings.mask_token_id, "causal", batch_size=8)
        res["causal"] = {"ar": ev["ar"], "ar_tokens": ev["ar_tokens"], "mdm": ev["mdm"], "acc": ev["acc"],
                         "mdm_tokens": ev["mdm_tokens"]}
        if settings.context_mask == "block-causal" or name == "source":
            # also with BD3-LM's block-causal clean copy (its AR figure would leak the block, so it is not kept)
            evb = evaluate(model, rows, [2, 4, 8], settings.mask_token_id, "block-causal", batch_size=8)
            res["block-causal"] = {"mdm": evb["mdm"], "acc": evb["acc"], "mdm_tokens": evb["mdm_tokens"]}
        res["eval_s"] = round(time.time() - t0, 1)
        results[name] = res
        print(name, json.dumps(res), flush=True)
    meta = {"eval_rows": len(rows), "seq_len": args.seq_len, "tokens": int(rows.real_tokens)}
    (args.root / f"results-{RUNS}.json").write_text(json.dumps({"meta": meta, "models": results}, indent=2))
    print_table(results, meta)


def print_table(results: dict, meta: dict) -> None:
    src = results["source"]["causal"]
    print(f"\nheld-out: {meta['eval_rows']} rows x {meta['seq_len']} tokens ({meta['tokens']} tokens)")
    print("| model | AR loss (b=1) | vs source | MDM b=2 | MDM b=4 | MDM b=8 | acc b=2 | acc b=4 | acc b=8 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        c = r["causal"]
        rel = (c["ar"] / src["ar"] - 1) * 100
        print(f"| {name} | {c['ar']:.3f} | {rel:+.1f}% | " + " | ".join(f"{c['mdm'][b]:.3f}" for b in (2, 4, 8))
              + " | " + " | ".join(f"{c['acc'][b]:.3f}" for b in (2, 4, 8)) + " |")
    for name, r in results.items():
        if "block-causal" in r:
            c = r["block-causal"]
            print(f"| {name} (block-causal context) | - | - | " + " | ".join(f"{c['mdm'][b]:.3f}" for b in (2, 4, 8))
                  + " | " + " | ".join(f"{c['acc'][b]:.3f}" for b in (2, 4, 8)) + " |")


def cmd_leak(args) -> None:
    """Next-token CE of the clean copy read through a block-causal mask, by block size.

    With `block(j) <= block(i)` a clean token sees the rest of its own block, so the next token is
    visible whenever it is in the same block: a model trained with L_AR on that copy can learn to
    copy it. A model that did not learn it gets worse as b grows; one that did gets better.
    """
    import torch

    from nbdiff.adapt.evaluation import evaluate

    torch.set_num_threads(args.threads)
    out, rows = {}, None
    for name, path in models(args).items():
        model, tok, settings = load(path)
        if rows is None:
            rows = heldout_rows(args, tok)
        out[name] = {b: evaluate(model, rows, [b], settings.mask_token_id, "block-causal", batch_size=8)["ar"]
                     for b in (1, 2, 8)}
        print(name, {b: round(v, 4) for b, v in out[name].items()}, flush=True)
    (args.root / f"leak-{RUNS}.json").write_text(json.dumps(out, indent=2))


def cmd_decode(args) -> None:
    import torch

    import nbdiff

    torch.set_num_threads(args.threads)
    docs = [json.loads(line)["text"] for line in (args.root / "data" / "heldout.jsonl").read_text().splitlines()]
    # a prompt = the opening of a held-out chapter's second paragraph (about 30 tokens of text)
    prompts = []
    for d in docs[:PROMPTS]:
        paras = [p for p in d.split("\n\n") if len(p) > 200]
        prompts.append(paras[0][:160].rsplit(" ", 1)[0])
    out = {}
    for name, path in models(args).items():
        model, tok = nbdiff.load(path, device="cpu", dtype="fp32")
        for b in (1, 4, 8):
            tpf, texts, secs = [], [], 0.0
            for p in prompts:
                text, final = nbdiff.generate(model, tok, p, raw=True, block_size=b, max_new_tokens=args.new_tokens,
                                              threshold=args.threshold)
                tpf.append(final.tokens_per_forward)
                texts.append(text)
                secs += final.seconds
            out[f"{name}/b{b}"] = {"tokens_per_forward": sum(tpf) / len(tpf), "per_prompt": tpf, "texts": texts,
                                   "seconds": round(secs, 2)}
            print(name, b, f"{sum(tpf) / len(tpf):.2f} tokens/forward", repr(texts[0][:120]), flush=True)
    (args.root / f"decode-{RUNS}-t{args.threshold}.json").write_text(json.dumps({"prompts": prompts, "results": out}, indent=2))


def cmd_plot(args) -> None:
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    for name in VARIANTS:
        metrics = run_dir(args.root, name) / "metrics.jsonl"
        if metrics.is_file():
            cmd = ["nbdiff", "plot", str(metrics), "--out", str(docs / f"adaptation-{RUNS}-{name}.png"),
                   "--title", f"tiny Llama on Austen: {name}"]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)


def cmd_compare(args) -> None:
    """One figure for all variants: the in-run held-out evaluations (nbdiff's own eval rows) vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    panels = [("AR loss (b=1)", lambda r: r["ar"])] + [
        (f"MDM loss b={b}", lambda r, b=b: r["mdm"].get(str(b))) for b in (2, 4, 8)]
    colors = dict(zip(VARIANTS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for name in VARIANTS:
        metrics = run_dir(args.root, name) / "metrics.jsonl"
        if not metrics.is_file():
            continue
        evals = [json.loads(x) for x in metrics.read_text().splitlines() if '"event": "eval"' in x]
        for i, (ax, (title, get)) in enumerate(zip(axes, panels)):
            if i == 0 and name == "block-causal":
                continue  # its in-run "ar" is read from a block-causal clean copy at b=8: it sees its own block
            pts = [(r["step"], get(r)) for r in evals if get(r) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name, color=colors[name])
            ax.set_title(title)
            ax.set_xlabel("step")
    handles = [plt.Line2D([], [], color=c, marker="o", label=n) for n, c in colors.items()
               if (run_dir(args.root, n) / "metrics.jsonl").is_file()]
    axes[0].legend(handles=handles, fontsize=8)
    axes[0].text(0.02, 0.02, "block-causal: not shown (its in-run AR\nfigure is read through a block-causal mask)",
                 transform=axes[0].transAxes, fontsize=7)
    fig.suptitle("nbdiff adapt on a 3.3M tiny Llama (curriculum 1,2,4,8); held-out rows of the training stream, "
                 "each run with its own context mask")
    fig.tight_layout()
    out = Path(args.docs) / f"adaptation-{RUNS}.png"
    fig.savefig(out, dpi=100)
    print("wrote", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=("convert", "adapt", "evaluate", "decode", "plot", "compare", "leak"))
    ap.add_argument("--root", type=Path, default=ROOT)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--eval-rows", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=0.9, help="decode: confidence threshold")
    ap.add_argument("--docs", default="docs")
    ap.add_argument("--runs", default="runs", help="sub-folder of --root holding this set of runs")
    args = ap.parse_args()
    global RUNS
    RUNS = args.runs
    {"convert": cmd_convert, "adapt": cmd_adapt, "evaluate": cmd_evaluate, "decode": cmd_decode,
     "plot": cmd_plot, "compare": cmd_compare, "leak": cmd_leak}[args.stage](args)


if __name__ == "__main__":
    main()
