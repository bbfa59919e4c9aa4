"""Write a trained drafter (an `nbdiff adapt --target drafter` run folder) as a folder to ship: its weights
in bf16 (half the bytes; the drafter runs in the model's dtype, and its fp32 upcast of bf16 weights is
exact), its config as the run wrote it (the model's fingerprint and embedding probe, by which
`--drafter auto` finds it). Checked against the model it was trained for before anything is written,
and written atomically.

    python scripts/ship_drafter.py /work/data/runs/Q4 /work/models/qwen05-nbdiff \\
        assets/drafters/qwen2.5-coder-0.5b-instruct --name "Qwen2.5-Coder-0.5B-Instruct (its Q4_K_M GGUF, converted by nbdiff)"
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="the drafter run folder (config.json and model.safetensors)")
    parser.add_argument("model", help="the model folder it drafts for")
    parser.add_argument("out", help="the folder to write (a drafter folder's weights and config are replaced, its other files kept)")
    parser.add_argument("--name", default=None, help="the model's name to record (default: the run's)")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from nbdiff.drafter.folder import is_drafter_folder, load_drafter, save_drafter

    out = Path(args.out)
    if out.exists() and not is_drafter_folder(out):
        raise SystemExit(f"{out} exists and is not a drafter folder: not replacing it")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    drafter = load_drafter(args.run, model)  # refuses a drafter of another model
    if args.name:
        drafter.config = dataclasses.replace(drafter.config, target_name=args.name)
    own = list(drafter.parameters())  # its own weights only: the model's embedding and head are borrowed, never saved
    with torch.no_grad():
        for p in own:
            p.data = p.data.to(torch.bfloat16)
    save_drafter(drafter, out)  # a drafter folder keeps its other files (README)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"{out}: {sum(p.numel() for p in own) / 1e6:.1f}M parameters in bf16, {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
