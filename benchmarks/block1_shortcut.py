"""Training step at block size 1: the one-pass shortcut of nbdiff.method.layout vs the general 2L pass.

b = 2 with nothing masked runs the general 2L pass on the same tokens (same cost as b = 1 without
the shortcut). 10M-parameter Llama, seq 512, fp32, CPU. Run: python benchmarks/block1_shortcut.py

Feeds docs/benchmarks/training.md, section "Training efficiency: one-pass 2L layout vs one forward per block vs plain AR / Block size 1: one pass instead of two".
"""
import time, torch
from nbdiff.testing import tiny_model
from nbdiff.method.layout import parallel_forward
from nbdiff.method.losses import ar_loss
torch.manual_seed(0)
m = tiny_model("llama", hidden_size=256, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8, vocab_size=4096).train()
L=512; x0=torch.randint(0,4096,(1,L)); pos=torch.arange(L)[None]; doc=torch.zeros_like(pos)
seen=[]; m.register_forward_pre_hook(lambda mod, a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
def run(b):
    xt = x0.clone()
    n,c=parallel_forward(m,xt,x0,pos,doc,b); l,_=ar_loss(c,x0,pos>0); l.backward(); m.zero_grad()
for b in (1, 2):  # b=2 with nothing masked = the general 2L pass of the same cost
    run(b); ts=[]
    for _ in range(3):
        t=time.perf_counter(); run(b); ts.append(time.perf_counter()-t)
    print(f"b={b}: forward length {seen[-1]}, {sorted(ts)[1]:.2f} s/step ({L/sorted(ts)[1]:.0f} train tokens/s)")
