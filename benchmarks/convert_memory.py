"""Peak memory of `nbdiff convert` on a synthetic sharded bf16 Llama-shaped checkpoint.

Writes a checkpoint of about `--gb` GB (default 3.2) in `--shards` safetensors shards directly
with safetensors (constant-filled tensors; the model is never built), plus the tiny test
tokenizer with a matching vocabulary, into a temporary folder. Then runs `nbdiff convert` in a
subprocess and reports its peak resident set size (getrusage RUSAGE_CHILDREN) against the target
"at most twice the largest shard plus 1.5 GB". Everything is deleted afterwards.

    python benchmarks/convert_memory.py [--gb 3.2] [--shards 4] [--keep]

Feeds docs/benchmarks/convert.md, section "`nbdiff convert` / Peak memory on a sharded checkpoint".
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=3.2, help="checkpoint size in GB (>= 3)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

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
