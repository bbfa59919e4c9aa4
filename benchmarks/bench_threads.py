"""One SmolLM2 forward of 16 rows x 1 token with N torch threads: python benchmarks/bench_threads.py N

On a CPU shared by many processes, compare N=1 with N=2 (wall and CPU seconds per forward).

Feeds docs/benchmarks/default-model.md, section "Default model (issue 11) / How it was made".
"""

import sys
import time

import torch

import nbdiff

torch.set_num_threads(int(sys.argv[1]))
m, t = nbdiff.load("/work/models/smollm2-nbdiff", device="cpu")
x = torch.randint(0, 1000, (16, 1))
with torch.inference_mode():
    m(x)
    t0 = time.perf_counter(); c0 = time.process_time()
    for _ in range(10):
        m(x)
    print(sys.argv[1], "wall/forward", (time.perf_counter() - t0) / 10, "cpu/forward", (time.process_time() - c0) / 10)
