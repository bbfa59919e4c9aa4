"""Does a turn through a kept conversation (nbdiff.api.Session, as `nbdiff chat` keeps it) give a fresh call's tokens?

    python benchmarks/session_agreement.py --dtype fp32 --conversations 8 --max-new-tokens 40
    python benchmarks/session_agreement.py --dtype bf16 --conversations 8 --max-new-tokens 40

Each conversation is a prompt of assets/prompts/distill.jsonl and two follow-ups; every turn is
decoded greedily at block size 1 through the session and fresh on the same message list, on the
default model (SmolLM2-135M-Instruct + the shipped adapter). Prints the turns whose tokens are
identical, and where the others part. Not timed (run it under the shared lock with OMP_NUM_THREADS=1).

In 16-bit weights the keys/values a session keeps were computed in passes of other shapes (one
token at a time for a reply) than the fresh call's one prefill, and round differently there; a
near-tie can then go the other way. Measured on "Intel(R) Xeon(R) Processor" (model 207, AVX-512,
no native bf16: torch's bf16 products), 8 conversations x 3 turns, 40 tokens:
fp32 24 of 24 identical, bf16 22 of 24. That is why `nbdiff chat` loads fp32 under --dtype auto on
a CPU (nbdiff.loading.CHAT_DTYPE_REASON).
"""

from __future__ import annotations

import argparse
import json

import nbdiff
from nbdiff.api import Session, generate
from nbdiff.default_model import ensure_default_model
from nbdiff.hardware import cpu_name
from nbdiff.resources import asset_path

FOLLOW_UPS = ["Say that again in other words.", "Now in one short sentence."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--start", type=int, default=0, help="the first prompt of distill.jsonl to use")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--model", default=None, help="a model folder (default: the default model)")
    args = parser.parse_args()
    model, tok = nbdiff.load(args.model or ensure_default_model(), dtype=args.dtype)
    lines = asset_path("prompts", "distill.jsonl").read_text(encoding="utf-8").splitlines()
    prompts = [json.loads(line)["prompt"] for line in lines[args.start: args.start + args.conversations]]
    same = total = 0
    for prompt in prompts:
        session, messages = Session(), []
        for turn, user in enumerate([prompt] + FOLLOW_UPS):
            messages.append({"role": "user", "content": user})
            text, kept = generate(model, tok, messages, session=session, block_size=1, max_new_tokens=args.max_new_tokens)
            _, fresh = generate(model, tok, messages, block_size=1, max_new_tokens=args.max_new_tokens)
            a, b = kept.tokens[0], fresh.tokens[0]
            total += 1
            if a == b:
                same += 1
            else:
                at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                print(f"turn {turn} of {prompt[:40]!r}: parts at token {at}: kept {tok.decode(a[at - 3: at + 9])!r}, "
                      f"fresh {tok.decode(b[at - 3: at + 9])!r}")
            messages.append({"role": "assistant", "content": text})
    print(f"{args.dtype} ({model.dtype}) on {cpu_name()}: {same} of {total} turns identical to a fresh call")


if __name__ == "__main__":
    main()
