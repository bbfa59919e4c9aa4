"""Exact mode against transformers greedy generate() on a model folder: equality, tokens/forward, acceptance.

    python benchmarks/exact_check.py 20        # new tokens per prompt; model /work/models/smollm2-nbdiff

Feeds docs/benchmarks/exact-mode.md, section "Exact mode (issue 12) / Exact mode against generate() on the converted SmolLM2".
"""
import time, torch, json, sys
torch.set_num_threads(2)
from nbdiff.api import load, encode
from nbdiff.decode.decoder import decode
from nbdiff.decode.options import DecodeOptions
from nbdiff.loading import model_settings
model, tok = load("/work/models/smollm2-nbdiff", device="cpu", dtype="fp32")
mask = model_settings(model).mask_token_id
prompts = ["List five fruits, one per line.", "Write a Python function that reverses a string.",
           "Repeat this sentence twice: the quick brown fox jumps over the lazy dog."]
N = int(sys.argv[1]) if len(sys.argv) > 1 else 32
rows = {}
for text in prompts:
    ids = encode(tok, text)
    t = time.perf_counter()
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    rows.setdefault("generate", []).append((N, N, time.perf_counter() - t, None, None))
    for name, opts in [("exact diffusion, one-shot draft", dict(draft_steps=1)), ("exact diffusion, until filled", dict()),
                       ("exact ngram", dict(drafter="ngram"))]:
        t = time.perf_counter()
        final = list(decode(model, [ids], DecodeOptions(block_size=8, exact=True, max_new_tokens=N, **opts), mask_token_id=mask, eos_token_ids=[]))[-1]
        dt = time.perf_counter() - t
        assert final.tokens[0] == ref, (name, text)
        rows.setdefault(name, []).append((final.new_tokens, final.forwards, dt, final.accepted_length, final.accepted_at))
print("all exact outputs equal generate() greedy")
for name, r in rows.items():
    tokens = sum(x[0] for x in r); fwd = sum(x[1] for x in r); sec = sum(x[2] for x in r)
    acc = [x[3] for x in r if x[3] is not None]
    at = [sum(x[4][k] for x in r) for k in range(7)] if r[0][4] is not None else None
    print(f"| {name} | {tokens} | {fwd} | {tokens/fwd:.2f} | {sum(acc)/len(acc) if acc else 1:.2f} | {tokens/sec:.2f} | {at} |")
