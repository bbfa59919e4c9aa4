"""adapt steps on SmolLM2 (LoRA r16, batch 2 x 128, block 4, 4 steps): --dtype auto vs fp32, per-step losses.

    python benchmarks/adapt_dtype.py SEED {auto,fp32}

Feeds docs/benchmarks/bf16-cpu.md, section "bf16 on CPU (issue 17)".
"""
import json, os, sys, time, resource
from nbdiff.adapt.recipe import AdaptConfig
from nbdiff.adapt.trainer import adapt
seed, dtype = int(sys.argv[1]), sys.argv[2]
recs = []
cfg = AdaptConfig(model="/work/models/smollm2-nbdiff", data=["/work/shared/data/austen.txt"], out=f"/tmp/b2/adapt-{dtype}-{seed}",
                  steps=4, seq_len=128, batch_size=2, block_size=4, curriculum="none", lora_rank=16, lr=1e-4,
                  eval_fraction=0, log_every=1, seed=seed, dtype=dtype, force=True, save_every=0, warmup_steps=1)
t = time.process_time()
res = adapt(cfg, callback=recs.append)
train = [r for r in recs if r["event"] == "train"]
start = next(r for r in recs if r["event"] == "start")
print(json.dumps({"seed": seed, "dtype": dtype, "losses": [round(r["loss"], 4) for r in train],
                  "step_s": [round(r["step_seconds"], 2) for r in train], "notes": start["notes"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                  "cpu_s_total": round(time.process_time() - t, 1), "load": os.getloadavg()[0]}))
