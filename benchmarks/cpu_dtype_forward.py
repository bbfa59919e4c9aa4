"""One cached forward of 1 token over 256 cached tokens, fp32 vs bf16 models in one process, alternating.

    python benchmarks/cpu_dtype_forward.py 2    # threads

Feeds docs/benchmarks/bf16-cpu.md, section "bf16 on CPU (issue 17)".
"""
import torch, time
from transformers import AutoModelForCausalLM, DynamicCache
import sys; torch.set_num_threads(int(sys.argv[1]))
ms = {d: AutoModelForCausalLM.from_pretrained("/work/models/smollm2-nbdiff", dtype=d, attn_implementation="sdpa").eval() for d in (torch.float32, torch.bfloat16)}
ids = torch.randint(0, 49152, (1, 256))
res = {d: [] for d in ms}
with torch.no_grad():
    caches = {}
    for d, m in ms.items():
        c = DynamicCache(); m(input_ids=ids, past_key_values=c, use_cache=True); caches[d] = c
    for rep in range(8):
        for d, m in ms.items():
            c = caches[d]
            t = time.process_time(); w = time.perf_counter()
            out = m(input_ids=ids[:, :1], past_key_values=c, use_cache=True)
            res[d].append((time.process_time() - t, time.perf_counter() - w))
            c.crop(-1)
for d, r in res.items():
    r = sorted(r)
    print(d, "median cpu ms", round(1000 * r[len(r)//2][0], 1), "min wall ms", round(1000 * min(x[1] for x in r), 1))
