"""Peak memory of `nbdiff convert`: a synthetic sharded bf16 checkpoint, or a real GGUF file.

Synthetic (default): writes a checkpoint of about `--gb` GB (default 3.2) in `--shards`
safetensors shards directly with safetensors (constant-filled tensors; the model is never built),
plus the tiny test tokenizer with a matching vocabulary, into a temporary folder. Then runs
`nbdiff convert` in a subprocess and reports its peak resident set size (getrusage
RUSAGE_CHILDREN) against the target "at most twice the largest shard plus 1.5 GB".

GGUF (`--gguf FILE`): converts the file in a subprocess and reports peak RSS and wall time against
"at most twice the largest tensor in fp32 plus 1.5 GB" (the largest tensor read from the file's
tensor table). `--code DIR` runs the converter from another checkout (a `git worktree` of an
older commit) for a before/after comparison. `--logits` then loads the file with transformers
(`from_pretrained(folder, gguf_file=...)`, fp32) and the converted folder, one after the other in
a fresh subprocess, and prints the largest absolute logit difference on a chat prompt (over the
file's vocabulary; the converted model has one more row, the mask token).

    python benchmarks/convert_memory.py [--gb 3.2] [--shards 4] [--keep]
    python benchmarks/convert_memory.py --gguf model.gguf [--code DIR] [--logits] [--keep]

Everything is written into a temporary folder and deleted afterwards unless `--keep`.
Feeds docs/benchmarks/convert.md, section "`nbdiff convert` / Peak memory on a sharded checkpoint",
and docs/benchmarks/real-models.md, section "Converting GGUF tensor by tensor".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def llama_shapes(vocab: int, hidden: int, inter: int, layers: int, kv_heads: int, head_dim: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a LlamaForCausalLM (untied lm_head), in checkpoint order."""
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_checkpoint(folder: Path, target_gb: float, n_shards: int) -> tuple[int, int]:
    """Write the synthetic checkpoint; returns (total bytes, largest shard bytes)."""
    from safetensors.torch import save_file

    from nbdiff.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    vocab, hidden, inter, heads, kv_heads = len(tok), 2048, 5632, 16, 4
    head_dim = hidden // heads
    per_layer = 2 * hidden * hidden + 2 * kv_heads * head_dim * hidden + 3 * inter * hidden
    layers = max(1, round(target_gb * 1e9 / 2 / per_layer))
    shapes = llama_shapes(vocab, hidden, inter, layers, kv_heads, head_dim)
    total = sum(numel(s) for _, s in shapes) * 2
    budget = total / n_shards
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        b = numel(shape) * 2
        if groups[-1] and size + b > budget * 1.02 and len(groups) < n_shards:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += b
    weight_map, largest = {}, 0
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        # constant data: cheap to make; the converter's memory does not depend on the values
        tensors = {k: torch.full(s, 0.01, dtype=torch.bfloat16) for k, s in group}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        del tensors
        weight_map.update({k: name for k, _ in group})
        largest = max(largest, (folder / name).stat().st_size)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    tok.save_pretrained(str(folder))
    return total, largest


def largest_fp32_tensor(path: Path) -> tuple[str, int]:
    """(name, bytes in fp32) of the GGUF file's largest tensor, from its tensor table."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    biggest = max(reader.tensors, key=lambda t: int(t.n_elements))
    return biggest.name, int(biggest.n_elements) * 4


def run_convert(source: Path, out: Path, code: Path | None) -> tuple[float, int]:
    """Run `nbdiff convert` in a subprocess; (seconds, peak RSS bytes). Call once per process:
    RUSAGE_CHILDREN keeps the largest child seen so far."""
    env = dict(os.environ)
    if code is not None:  # another checkout's nbdiff first on the path
        env["PYTHONPATH"] = os.pathsep.join([str(code), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "nbdiff_cli.app", "convert", str(source), "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(out.parent))
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr, sep="\n")
        raise SystemExit(f"convert failed with exit code {proc.returncode}")
    # ru_maxrss of the largest waited-for child, in KiB on Linux
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


LOGITS_PROMPT = "Write a Python function that returns the n-th Fibonacci number."

_LOGITS_CHILD = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
gguf, out, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
from pathlib import Path
tok = AutoTokenizer.from_pretrained(out)
text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
ids = tok(text, return_tensors="pt").input_ids
with torch.no_grad():
    ref = AutoModelForCausalLM.from_pretrained(str(Path(gguf).parent), gguf_file=Path(gguf).name, dtype=torch.float32)
    a = ref(input_ids=ids).logits
    vocab = a.shape[-1]
    del ref
    conv = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    b = conv(input_ids=ids).logits[..., :vocab]
diff = (a - b).abs().max().item()
same = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
print(f"logits on a {ids.shape[1]}-token chat prompt: max |transformers(gguf) - converted| = {diff:.3g}, "
      f"argmax agreement {same:.0%}, equal: {torch.equal(a, b)}")
"""


def gguf_main(args) -> None:
    gguf = Path(args.gguf).resolve()
    name, largest = largest_fp32_tensor(gguf)
    target = 2 * largest + 1.5e9
    root = Path(tempfile.mkdtemp(prefix="nbdiff-convert-bench-"))
    try:
        out = root / "out"
        seconds, peak = run_convert(gguf, out, Path(args.code).resolve() if args.code else None)
        out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        who = f"converter from {args.code}" if args.code else "converter of this checkout"
        print(f"{gguf.name} ({gguf.stat().st_size / 1e9:.2f} GB), {who}")
        print(f"convert: {seconds:.1f} s wall, output {out_bytes / 1e9:.2f} GB, threads {torch.get_num_threads()}")
        print(f"peak RSS {peak / 1e9:.2f} GB; target <= 2 x {largest / 1e9:.3f} ({name} in fp32) + 1.5 = "
              f"{target / 1e9:.2f} GB: {'PASS' if peak <= target else 'FAIL'}")
        if args.logits:
            proc = subprocess.run([sys.executable, "-c", _LOGITS_CHILD, str(gguf), str(out), LOGITS_PROMPT],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:])
                raise SystemExit("the logits comparison failed")
            print(proc.stdout.strip().splitlines()[-1])
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=3.2, help="checkpoint size in GB (>= 3)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--gguf", help="measure the conversion of this GGUF file instead")
    parser.add_argument("--code", help="with --gguf: run the converter from this checkout (PYTHONPATH)")
    parser.add_argument("--logits", action="store_true", help="with --gguf: compare logits with transformers' load")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    if args.gguf:
        gguf_main(args)
        return

    root = Path(tempfile.mkdtemp(prefix="nbdiff-convert-bench-"))
    try:
        src = root / "src"
        src.mkdir()
        t0 = time.perf_counter()
        total, largest = write_checkpoint(src, args.gb, args.shards)
        print(f"synthetic checkpoint: {total / 1e9:.2f} GB in {args.shards} shards, largest {largest / 1e9:.2f} GB "
              f"(written in {time.perf_counter() - t0:.0f} s)")
        cmd = [sys.executable, "-m", "nbdiff_cli.app", "convert", str(src), "--out", str(root / "out")]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, sep="\n")
            raise SystemExit(f"convert failed with exit code {proc.returncode}")
        # ru_maxrss of the largest waited-for child, in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        target = 2 * largest + 1.5e9
        out_bytes = sum(p.stat().st_size for p in (root / "out").glob("*.safetensors"))
        print(f"convert: {seconds:.0f} s, output {out_bytes / 1e9:.2f} GB")
        print(f"peak RSS {peak / 1e9:.2f} GB; target <= 2 x {largest / 1e9:.2f} + 1.5 = {target / 1e9:.2f} GB: "
              f"{'PASS' if peak <= target else 'FAIL'}")
        if peak > target:
            raise SystemExit(1)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
