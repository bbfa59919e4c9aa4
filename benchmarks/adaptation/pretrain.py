"""Pretrain a tiny Llama as a plain AR model on the Austen training chapters (the "source model").

    python benchmarks/adaptation/pretrain.py --data /work/runs/adaptation --out /work/runs/adaptation/tiny-ar \
        --steps 240

A plain torch loop (no nbdiff code): the point is to have a real, if small, AR checkpoint to
convert and adapt. Chapters are joined with <|endoftext|> and cut into rows of --seq-len tokens.
Writes an ordinary Hugging Face folder (config.json, model.safetensors, tokenizer files) plus
pretrain_log.jsonl, and prints the held-out AR loss.

Feeds docs/benchmarks/central-claim.md, section "The central claim at small scale / Setup".
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def load_rows(path: Path, tok, seq_len: int) -> torch.Tensor:
    """Every chapter + EOS, concatenated, cut into [N, seq_len] rows (the tail is dropped)."""
    ids: list[int] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        ids.extend(tok(json.loads(line)["text"])["input_ids"])
        ids.append(tok.eos_token_id)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def heldout_loss(model, rows: torch.Tensor, batch: int = 16) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        x = rows[i : i + batch]
        out = model(input_ids=x, labels=x)
        n = x.numel() - x.shape[0]  # targets per row: seq_len - 1
        total += out.loss.item() * n
        count += n
    model.train()
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/runs/adaptation", help="folder written by prepare_data.py")
    ap.add_argument("--out", default="/work/runs/adaptation/tiny-ar")
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = Path(args.data)
    tok = AutoTokenizer.from_pretrained(data / "tokenizer")
    train = load_rows(data / "data" / "train.jsonl", tok, args.seq_len)
    held = load_rows(data / "data" / "heldout.jsonl", tok, args.seq_len)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def lr_at(step: int) -> float:  # linear warmup, cosine to 10%
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "pretrain_log.jsonl", "w")
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=gen)
    pos = 0
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        if pos + args.batch_size > len(order):
            order, pos = torch.randperm(len(train), generator=gen), 0
        x = train[order[pos : pos + args.batch_size]]
        pos += args.batch_size
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        rec = {"step": step + 1, "loss": round(loss.item(), 4), "lr": lr_at(step), "elapsed_s": round(time.time() - t0, 1)}
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            rec["heldout_ar_loss_32rows"] = round(heldout_loss(model, held[:32]), 4)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if (step + 1) % 10 == 0:
            print(json.dumps(rec), flush=True)
    final = heldout_loss(model, held)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    summary = {"params": n_params, "steps": args.steps, "tokens_seen": args.steps * args.batch_size * args.seq_len,
               "train_rows": len(train), "heldout_rows": len(held), "heldout_ar_loss": round(final, 4),
               "wall_s": round(time.time() - t0, 1)}
    (out / "pretrain_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
