"""Split the Austen text into train / held-out chapters and train a byte-level BPE tokenizer.

    python benchmarks/adaptation/prepare_data.py --text /work/shared/data/austen.txt \
        --out /work/runs/adaptation

Writes OUT/data/{train,heldout}.jsonl (one chapter per line, field `text`), the same as plain text
files OUT/data/{train,heldout}.txt, and OUT/tokenizer/ (a PreTrainedTokenizerFast folder, vocab
4096, ChatML specials). The split is by chapter: every 20th chapter (5%) is held out, so the
held-out text is spread over all six novels and never shares a chapter with the training text.

Feeds docs/benchmarks/central-claim.md, section "The central claim at small scale / Setup".
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def split_chapters(text: str) -> list[str]:
    """Chapters as documents: cut before every 'CHAPTER ...' / 'Chapter ...' heading line."""
    parts = re.split(r"\n(?=(?:CHAPTER|Chapter) [0-9IVXLC]+\.?\s*\n)", text)
    # normalise hard-wrapped lines: paragraphs are separated by blank lines in the source
    out = []
    for part in parts:
        paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", part)]
        doc = "\n\n".join(p for p in paras if p)
        if len(doc) > 200:  # drop title pages and volume headings
            out.append(doc)
    return out


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token=None, additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default="/work/shared/data/austen.txt")
    ap.add_argument("--out", default="/work/runs/adaptation")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--holdout-every", type=int, default=20)
    args = ap.parse_args()

    chapters = split_chapters(Path(args.text).read_text(encoding="utf-8"))
    held = [c for i, c in enumerate(chapters) if i % args.holdout_every == args.holdout_every - 1]
    train = [c for i, c in enumerate(chapters) if i % args.holdout_every != args.holdout_every - 1]
    data = Path(args.out) / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, docs in (("train", train), ("heldout", held)):
        with open(data / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
        (data / f"{name}.txt").write_text("\n\n\n".join(docs) + "\n", encoding="utf-8")
    tok = train_tokenizer(train, args.vocab_size)
    tok.save_pretrained(Path(args.out) / "tokenizer")
    n_train = sum(len(tok(d)["input_ids"]) for d in train)
    n_held = sum(len(tok(d)["input_ids"]) for d in held)
    print(json.dumps({"chapters": len(chapters), "train_chapters": len(train), "heldout_chapters": len(held),
                      "train_tokens": n_train, "heldout_tokens": n_held, "vocab": len(tok)}))


if __name__ == "__main__":
    main()
