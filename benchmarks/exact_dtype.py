"""Exact mode against plain AR (block size 1) in bf16 and fp32 on the converted SmolLM2: identical replies and tokens/forward.

    python benchmarks/exact_dtype.py [MODEL_DIR]

Feeds docs/benchmarks/bf16-cpu.md, section "bf16 on CPU (issue 17)".
"""
import sys

import nbdiff

MODEL = sys.argv[1] if len(sys.argv) > 1 else "smollm2-nbdiff"
prompts = ["Write a short story about a lighthouse keeper.", "List five fruits and their colours.", "Explain what a hash table is."]
for dt in ("bf16", "fp32"):
    m, t = nbdiff.load(MODEL, device="cpu", dtype=dt)
    same = 0; tpf = []
    for p in prompts:
        a, fa = nbdiff.generate(m, t, p, block_size=1, max_new_tokens=48)
        for drafter in ("diffusion", "ngram"):
            b, fb = nbdiff.generate(m, t, p, block_size=8, exact=True, draft_steps=1, drafter=drafter, max_new_tokens=48)
            same += fa.tokens[0] == fb.tokens[0]; tpf.append((drafter, round(fb.tokens_per_forward, 2), round(fb.tokens_per_second / fa.tokens_per_second, 2)))
    print(dt, "identical to b=1:", same, "/", 2 * len(prompts), tpf, flush=True)
