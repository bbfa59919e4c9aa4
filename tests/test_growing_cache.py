"""The cache that appends in place (nbdiff.decode.context.GrowingLayer) under the lean forward's C++
layers (layers.cpp writes the new keys/values into the room): the bits of transformers' forward over
a plain DynamicCache at depths that cross the room's growth, after a crop and a new append, for
several rows, in the server's packed lane, and after a projection is swapped (the cached plan)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nbdiff import cpu_kernel
from nbdiff.cpu_kernel import fast_forward
from nbdiff.decode.context import GrowingLayer, growing_cache
from nbdiff.testing import lean_pair as _pair

pytestmark = pytest.mark.skipif(cpu_kernel.cpu_isa() == 0 or cpu_kernel._compiler() is None,
                                reason="needs an x86 CPU with AVX2+FMA and a C++ compiler")
ARCHS = ["llama", "qwen2"]


@pytest.mark.parametrize("shape", [(1, 9, 3, 100, 1), (1, 14, 2, 300, 1), (1, 9, 3, 77, 5), (2, 9, 3, 40, 8), (1, 4, 4, 30, 16)])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_over_a_room_view_has_the_bits_of_a_contiguous_cache(shape, masked):
    """SDPA over the first columns of a larger room (a strided view) = over the same values contiguous,
    in each form transformers' attention takes: grouped heads in SDPA, repeated keys, a packed query."""
    B, H, G, L, n = shape
    d, gen = 64, torch.Generator().manual_seed(L + n)
    room_k, room_v = torch.randn(B, G, 512, d, generator=gen), torch.randn(B, G, 512, d, generator=gen)
    k, v = room_k[:, :, :L + n], room_v[:, :, :L + n]  # [B, G, L + n, d], strided
    q = torch.randn(B, n, H, d, generator=gen).transpose(1, 2)  # [B, H, n, d] as the projections leave it
    mask = torch.ones(B, 1, n, L + n, dtype=torch.bool).tril(L) if masked else None
    sdpa = torch.nn.functional.scaled_dot_product_attention
    repeat = lambda t: t[:, :, None].expand(B, G, H // G, L + n, d).reshape(B, H, L + n, d)
    assert torch.equal(sdpa(q, k, v, attn_mask=mask, enable_gqa=H != G),
                       sdpa(q, k.contiguous(), v.contiguous(), attn_mask=mask, enable_gqa=H != G))
    assert torch.equal(sdpa(q, repeat(k), repeat(v), attn_mask=mask), sdpa(q, repeat(k.contiguous()), repeat(v.contiguous()), attn_mask=mask))
    if n == 1 and not masked:
        packed = q.reshape(B, G, H // G, d)
        assert torch.equal(sdpa(packed, k, v), sdpa(packed, k.contiguous(), v.contiguous()))


@pytest.mark.parametrize("fused", [True, False], ids=["fused-loops", "torch-elementwise"])
@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_appending_in_place_has_the_bits_of_concatenating(arch, fused, native_calls, monkeypatch):
    """Two rows: a prompt, one-token steps past the room's first growth (256 columns), a crop of 5 and other
    tokens appended where they were, a verify pass of 5; every logit equal to the original forward's over a
    plain DynamicCache, every few-row forward's layers in C++ over the room (with layers.cpp's fused elementwise
    loops, and with torch's elementwise operations there)."""
    from transformers import DynamicCache

    monkeypatch.setattr(fast_forward, "FUSED", fused)
    lean, reference = _pair(arch)
    V = lean.config.vocab_size
    ids = torch.randint(0, V, (2, 280), generator=torch.Generator().manual_seed(1))
    other = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(2))
    caches = {lean: growing_cache(lean.config), reference: DynamicCache(config=reference.config)}
    assert all(type(layer) is GrowingLayer for layer in caches[lean].layers)

    def run(model, x, start):
        pos = torch.arange(start, start + x.shape[1])[None].expand(2, -1)
        return model(input_ids=x, position_ids=pos, cache=caches[model], use_cache=True).logits

    outs = {m: [run(m, ids[:, :8], 0)] for m in (lean, reference)}
    for t in range(8, 270):
        for m in (lean, reference):
            outs[m].append(run(m, ids[:, t:t + 1], t))
    rooms = [layer._room[0] for layer in caches[lean].layers]
    assert rooms[0].shape[2] > 256  # it grew
    for m in (lean, reference):
        caches[m].crop(-5)  # exact mode's rejected drafts, a chat turn that starts again
        outs[m].append(run(m, other, 265))
        outs[m].append(run(m, ids[:, 270:275], 270))
    assert all(layer._room[0] is room for layer, room in zip(caches[lean].layers, rooms))  # in place, no copy
    for a, b in zip(outs[lean], outs[reference]):
        assert torch.equal(a, b)
    assert native_calls and all(native_calls)
    assert torch.equal(caches[lean].layers[0].keys, caches[reference].layers[0].keys)


@torch.no_grad()
def test_a_growing_layer_starts_a_new_room_when_its_tensors_are_replaced():
    """Row surgery (nbdiff.serve.rows) puts other tensors in keys/values: the next append copies them into a new
    room instead of writing into the old one, and an earlier view of the room is never written past a crop
    it did not see."""
    from transformers.cache_utils import DynamicLayer

    gen = torch.Generator().manual_seed(0)
    new = lambda n, b=1: torch.randn(b, 2, n, 8, generator=gen)
    mine, plain = GrowingLayer(), DynamicLayer()
    for step in (new(5), new(1), new(3)):
        mine.update(step, step)
        plain.update(step, step)
    room = mine._room[0]
    mine.keys, mine.values = mine.keys[:, :, 2:], mine.values[:, :, 2:]  # rows.trim: a view at an offset
    plain.keys, plain.values = plain.keys[:, :, 2:], plain.values[:, :, 2:]
    step = new(2)
    assert torch.equal(mine.update(step, step)[0], plain.update(step, step)[0]) and mine._room[0] is not room
    merged = new(mine.get_seq_length(), 2)  # rows.merge: more rows
    mine.keys = mine.values = merged
    plain.keys = plain.values = merged
    step = new(1, 2)
    assert torch.equal(mine.update(step, step)[1], plain.update(step, step)[1]) and mine._room[0].shape[0] == 2
    mine.keep(torch.tensor([0, 3, 4]))  # the packed lane's compaction
    assert torch.equal(mine.keys, plain.keys.index_select(2, torch.tensor([0, 3, 4])))


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_the_packed_lane_runs_its_layers_in_cpp_with_the_kernels_bits(arch, native_calls, monkeypatch):
    """The server's packed lane (its own mask, per-request positions, requests joining and leaving): every
    forward's logits as the original forward's, few-row forwards through the C++ layers."""
    from nbdiff.decode.options import DecodeOptions
    from nbdiff.serve.packed import PackedLane

    lean, reference = _pair(arch)
    options = DecodeOptions(block_size=1, max_new_tokens=12)
    prompts = [[5, 17, 33, 80, 12, 7, 99], [40, 41], [300, 12, 9, 9, 61, 3, 3, 8, 21]]
    logits = {}
    for model in (lean, reference):
        seen = logits[model] = []
        original = PackedLane._forward

        def keep(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            seen.append(out)
            return out

        monkeypatch.setattr(PackedLane, "_forward", keep)
        lane = PackedLane(model, prompts[:1], [options], [0], eos_token_ids=[], prefill_chunk=4)
        for step in range(40):
            if step in (2, 5):
                lane.admit([prompts[1 + (step == 5)]], [options], [1 + (step == 5)])
            lane.run_block()
            lane.release([i for i in range(lane.size) if lane.done(i)])
            if not lane.size:
                break
        monkeypatch.setattr(PackedLane, "_forward", original)
    assert len(logits[lean]) == len(logits[reference]) > 12
    for a, b in zip(logits[lean], logits[reference]):
        assert torch.equal(a, b)
    assert native_calls and all(native_calls)


@torch.no_grad()
def test_a_projection_swapped_after_a_forward_is_noticed(native_calls):
    """The lean forward keeps what it passes to C++ per model; a module or weight put in since is seen at the next forward."""
    from transformers import DynamicCache

    lean, reference = _pair("llama")
    ids = torch.randint(0, lean.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    run = lambda m: m(input_ids=ids, cache=DynamicCache(config=m.config), use_cache=True).logits
    assert torch.equal(run(lean), run(reference)) and native_calls == [True]
    for model in (lean, reference):  # a new weight in place of the old one
        proj = model.model.layers[1].mlp.down_proj
        proj.weight = nn.Parameter(proj.weight * 1.5)
    assert torch.equal(run(lean), run(reference)) and native_calls == [True, True]
    for model in (lean, reference):  # another module (a LoRA layer's place): the original forward
        attn = model.model.layers[0].self_attn
        plain = nn.Linear(attn.q_proj.in_features, attn.q_proj.out_features, bias=attn.q_proj.bias is not None)
        plain.load_state_dict(attn.q_proj.state_dict())
        attn.q_proj = plain
    assert torch.equal(run(lean), run(reference)) and native_calls == [True, True]


@pytest.mark.smollm2
@torch.no_grad()
def test_smollm2_in_place_fused_layers_have_the_bits_of_transformers(smollm2_folder, native_calls):
    """SmolLM2: one-token steps past the room's first growth, a crop and other tokens where they were, then a verify
    pass of 8: the lean forward (GrowingLayer cache, fused loops, kept plan) against transformers' own forward over
    a plain DynamicCache, with the kernel's products both; every logit equal."""
    from transformers import DynamicCache

    from nbdiff.loading import load_model

    lean, tokenizer = load_model(smollm2_folder, device="cpu", dtype="fp32")
    assert fast_forward.installed(lean)
    reference = copy.deepcopy(lean)
    fast_forward.uninstall(reference)
    prompt = tokenizer.encode("Write a haiku about the sea. The waves are")
    ids = torch.tensor([(prompt * 40)[:275]])
    caches = {lean: growing_cache(lean.config), reference: DynamicCache(config=reference.config)}
    run = lambda m, x, a: m(input_ids=x, position_ids=torch.arange(a, a + x.shape[1])[None], cache=caches[m],
                            use_cache=True).logits
    for m in (lean, reference):
        run(m, ids[:, :12], 0)
    for t in range(12, 262):
        assert torch.equal(run(lean, ids[:, t:t + 1], t), run(reference, ids[:, t:t + 1], t)), t
    for m in (lean, reference):
        caches[m].crop(-4)  # 258 columns left; other tokens go where the last 4 were
    other = ids[:, 100:108].flip(1)
    assert torch.equal(run(lean, other, 258), run(reference, other, 258))
    assert native_calls and all(native_calls)
