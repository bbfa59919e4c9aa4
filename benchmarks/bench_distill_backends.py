"""Distillation speed of one backend: python benchmarks/bench_distill_backends.py BACKEND BATCH N

BACKEND is nbdiff (the block decoder at block size 1) or hf (transformers generate()). Answers
prompts 200..200+N of the shipped file with 256 new tokens into /tmp and prints the reply tokens,
seconds and tokens/s. Compare two backends' files for equal replies.

Feeds docs/benchmarks/default-model.md, section "Default model (issue 11) / How it was made".
"""

import os
import sys

import torch

import nbdiff
from nbdiff.adapt.distill import distill, read_prompts

torch.set_num_threads(2)
m, t = nbdiff.load("/work/models/smollm2-nbdiff", device="cpu")
ps = read_prompts("assets/prompts/distill.jsonl", limit=400)[200:200 + int(sys.argv[3])]
out = f"/tmp/d_{sys.argv[1]}_{sys.argv[2]}.jsonl"
if os.path.exists(out):
    os.remove(out)
for p in distill(m, t, ps, out, batch_size=int(sys.argv[2]), backend=sys.argv[1], max_new_tokens=256):
    pass
print(sys.argv[1:], p.new_tokens, round(p.seconds, 1), round(p.tokens_per_second, 1), "truncated", p.truncated)
