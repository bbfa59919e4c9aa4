"""Weights stored in bf16 under fp32 arithmetic on the CPU (nbdiff.cpu_kernel.keep_bf16): the kernel
widens each weight as it reads it, so every product has the bits the fp32 kernel gives on the widened
weight, and every decoding pass, logit and reply the bits of the same model loaded in fp32 (half the
bytes read; about twice as fast per one-token step, docs/benchmarks/cpu-kernel.md); prompts of 17-64
rows take the kernel's many-row path instead of torch's product; weights that are not bf16 numbers
stay fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nbdiff import cpu_kernel
from nbdiff.cpu_kernel import fast_forward

pytestmark = pytest.mark.skipif(cpu_kernel.cpu_isa() == 0 or cpu_kernel._compiler() is None,
                                reason="needs an x86 CPU with AVX2+FMA and a C++ compiler")
ISAS = [isa for isa in (1, 2) if isa <= cpu_kernel.cpu_isa()]


@pytest.fixture(scope="module", autouse=True)
def ready():
    state = cpu_kernel.status()
    assert state.ready, state.reason


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k,n", [(1, 1), (7, 3), (16, 65), (33, 200), (600, 130)])  # tails: K not a multiple of 8/16
def test_a_bf16_weight_gives_the_fp32_kernels_bits_on_its_widened_values(isa, k, n):
    gen = torch.Generator().manual_seed(k * 7 + n)
    w16, b = torch.randn(n, k, generator=gen).bfloat16(), torch.randn(n, generator=gen)
    w32 = w16.float()
    for m in (0, 1, 2, 3, 5, 8, 9, 13, 16, 17, 40, 64):  # AVX2 takes up to 64 rows through its many-row tiles
        x = torch.randn(m, k, generator=gen)
        for bias in (None, b):
            got = cpu_kernel.small_m_linear(x, w16, bias, isa=isa)
            assert got.dtype is torch.float32 and got.shape == (m, n)
            assert torch.equal(got, cpu_kernel.small_m_linear(x, w32, bias, isa=isa)), m
            torch.testing.assert_close(got, F.linear(x, w32, bias), rtol=1e-5, atol=1e-5 * k ** 0.5)
    # a q/k/v-style call mixing stored dtypes: each output is its single product's
    ws = [w16, w32, torch.randn(9, k, generator=gen).bfloat16()]
    x = torch.randn(1, 5, k, generator=gen)
    got = torch.ops.nbdiff.small_m_linear_multi(x, ws, [b, None, None], isa)
    for y, w, bias in zip(got, ws, [b, None, None]):
        assert torch.equal(y, cpu_kernel.small_m_linear(x, w.float(), bias, isa=isa))


def test_a_bf16_weight_under_bf16_inputs_or_other_dtypes_is_refused():
    w = torch.randn(8, 32).bfloat16()
    with pytest.raises(RuntimeError, match="fp32 x with an fp32 or bf16 weight"):
        cpu_kernel.small_m_linear(torch.randn(2, 32).double(), w, isa=ISAS[-1])
    with pytest.raises(RuntimeError, match="fp32 or bf16 N x K"):
        torch.ops.nbdiff.small_m_linear_multi(torch.randn(2, 32), [w.half()], [None], ISAS[-1])


def _layer(k=32, n=48, bias=True, exact=True):
    layer = nn.Linear(k, n, bias=bias)
    if exact:
        with torch.no_grad():
            layer.weight.copy_(layer.weight.bfloat16().float())
    return layer


def test_keep_bf16_takes_only_weights_that_are_bf16_numbers():
    exact, inexact = _layer(), _layer(exact=False)
    before = exact.weight.detach().clone(), inexact.weight.detach().clone()
    assert cpu_kernel.bf16_exact(exact.weight) and not cpu_kernel.bf16_exact(inexact.weight)
    assert cpu_kernel.bf16_exact(exact.weight, chunk=5)  # read in pieces
    assert cpu_kernel.keep_bf16([exact, inexact]) == 1
    assert exact.weight.dtype is torch.bfloat16 and exact.bias.dtype is torch.float32 and exact._kept_bf16
    assert torch.equal(exact.weight.float(), before[0])
    assert inexact.weight.dtype is torch.float32 and torch.equal(inexact.weight, before[1])
    assert not hasattr(inexact, "_kept_bf16")


def test_a_kept_layer_has_the_fp32_layers_bits_few_rows_many_rows_and_with_autograd():
    ref = _layer()
    kept = _layer()
    kept.load_state_dict(ref.state_dict())
    cpu_kernel.install(nn.Sequential(ref))
    cpu_kernel.install(nn.Sequential(kept), bf16_weights=True)
    assert type(kept) is cpu_kernel.SmallRowsLinear and kept.weight.dtype is torch.bfloat16
    limit = cpu_kernel.max_rows(torch.float32, cpu_kernel.cpu_isa())  # the fp32 layer's kernel rows
    wide = cpu_kernel.max_rows(torch.float32, cpu_kernel.cpu_isa(), torch.bfloat16)  # the kept layer's: a prompt's too
    assert wide == 64 >= limit
    with torch.no_grad():
        for rows in (1, 3, limit, limit + 1, 40, wide, wide + 1, 100):
            x = torch.randn(rows, 32)
            if limit < rows <= wide:  # the kernel's many-row path, where the fp32 layer takes torch's product
                assert torch.equal(kept(x), cpu_kernel.small_m_linear(x, ref.weight, ref.bias)), rows
                torch.testing.assert_close(kept(x), ref(x), rtol=1e-5, atol=1e-5)
            else:  # the kernel, or above its rows torch's product on a widened copy: the fp32 layer's bits
                assert torch.equal(kept(x), ref(x)), rows
    x = torch.randn(4, 32, requires_grad=True)
    out = kept(x)
    assert torch.equal(out, ref(x))
    out.sum().backward()
    assert x.grad is not None and kept.weight.grad.dtype is torch.bfloat16
    model = nn.Sequential(kept)
    cpu_kernel.uninstall(model)  # a plain fp32 layer again, the same values
    assert type(kept) is nn.Linear and kept.weight.dtype is torch.float32 and torch.equal(kept.weight, ref.weight)
    assert not hasattr(kept, "_kept_bf16")


def test_the_switch_and_the_default_leave_fp32_weights(monkeypatch):
    layer = _layer()
    cpu_kernel.install(nn.Sequential(layer))  # bf16_weights is asked for by load_model only
    assert layer.weight.dtype is torch.float32
    layer = _layer()
    monkeypatch.setenv(cpu_kernel.BF16_SWITCH, "0")
    state = cpu_kernel.install(nn.Sequential(layer), bf16_weights=True)
    assert state.ready and layer.weight.dtype is torch.float32 and "bf16" not in state.reason


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: tied embeddings
@torch.no_grad()
def test_a_bf16_folder_decodes_in_fp32_with_the_fp32_bits(arch, tmp_path, monkeypatch):
    """load_model keeps a bf16 folder's projections in bf16: every pass decoding makes (through the lean
    forward in C++ and in Python, and transformers' own for a long prompt) and every reply (block 1, exact
    mode with lookup drafts, sampling) is the one the same folder gives with the weights widened to fp32."""
    from nbdiff.api import generate
    from nbdiff.loading import load_model
    from nbdiff.testing import save_tiny_converted

    folder = save_tiny_converted(tmp_path / arch, arch, block_size=4, adapted=4, dtype=torch.bfloat16)
    kept, tokenizer = load_model(folder, device="cpu", dtype="fp32")
    monkeypatch.setenv(cpu_kernel.BF16_SWITCH, "0")
    wide, _ = load_model(folder, device="cpu", dtype="fp32")
    monkeypatch.delenv(cpu_kernel.BF16_SWITCH)
    projections = [m for m in kept.modules() if type(m) is cpu_kernel.SmallRowsLinear]
    assert projections and all(m.weight.dtype is torch.bfloat16 for m in projections)
    assert "kept in bf16" in kept._nbdiff_cpu_kernel.reason
    assert kept.model.embed_tokens.weight.dtype is torch.float32 and kept.dtype is torch.float32
    if arch == "qwen2":  # the tied table: the embedding keeps its fp32 copy, the head reads a bf16 one
        assert wide.lm_head.weight is wide.model.embed_tokens.weight
        assert torch.equal(kept.lm_head.weight.float(), kept.model.embed_tokens.weight)
    assert all(m.weight.dtype is torch.float32 for m in wide.modules() if type(m) is cpu_kernel.SmallRowsLinear)
    assert fast_forward.installed(kept) and fast_forward.installed(wide)
    ids = torch.randint(0, 300, (2, 83))
    for native in (True, False):
        monkeypatch.setattr(fast_forward, "NATIVE", native)
        from transformers import DynamicCache

        caches = DynamicCache(config=kept.config), DynamicCache(config=wide.config)
        for a, b in ((0, 6), (6, 7), (7, 8), (8, 13), (13, 83)):  # a prompt, steps, a verify pass, a long one
            got, want = (m(input_ids=ids[:, a:b], cache=c, use_cache=True, output_hidden_states=True)
                         for m, c in zip((kept, wide), caches))
            assert torch.equal(got.logits, want.logits), (native, a, b)
            assert all(torch.equal(g, w) for g, w in zip(got.hidden_states, want.hidden_states))
    prompt = "the cat sat on the mat and the cat sat on the"
    for options in (dict(block_size=1), dict(block_size=1, temperature=0.8, seed=7),
                    dict(block_size=4, exact=True, drafter="ngram")):
        got = generate(kept, tokenizer, prompt, max_new_tokens=20, **options)
        want = generate(wide, tokenizer, prompt, max_new_tokens=20, **options)
        assert got[1].tokens == want[1].tokens and got[0] == want[0], options


@torch.no_grad()
def test_a_drafters_head_rows_from_a_kept_head_give_the_fp32_logits(tmp_path, monkeypatch):
    from nbdiff.loading import load_model
    from nbdiff.testing import random_drafter, save_tiny_converted

    folder = save_tiny_converted(tmp_path / "q", "qwen2", block_size=4, adapted=4, dtype=torch.bfloat16)
    kept, _ = load_model(folder, device="cpu", dtype="fp32")
    monkeypatch.setenv(cpu_kernel.BF16_SWITCH, "0")
    wide, _ = load_model(folder, device="cpu", dtype="fp32")
    mask = kept.config.vocab_size - 1
    drafters = [random_drafter(m, mask, block_size=4) for m in (kept, wide)]
    assert drafters[0].head(torch.zeros(1, 1, kept.config.hidden_size)).dtype is torch.float32
    h = torch.randn(1, 4, kept.config.hidden_size)
    assert torch.equal(drafters[0].head(h), drafters[1].head(h))


def test_the_plan_drafts_blocks_of_4_and_knows_the_bf16_costs_where_weights_are_kept_in_bf16(tmp_path, monkeypatch):
    """Kept bf16 weights halve a step's time but not an extra row's multiply-adds: a trained drafter's block is cut to
    TRAINED_BLOCK_BF16, and drafts cut by cost (COST_CUT True) take the bf16 verify costs; fp32 weights keep the
    drafter's block and the fp32 costs."""
    from nbdiff.decode import plan
    from nbdiff.decode.options import DecodeOptions
    from nbdiff.loading import load_model
    from nbdiff.testing import random_drafter, save_tiny_converted

    folder = save_tiny_converted(tmp_path / "l", "llama", block_size=8, adapted=8, dtype=torch.bfloat16)
    kept, _ = load_model(folder, device="cpu", dtype="fp32")
    monkeypatch.setenv(cpu_kernel.BF16_SWITCH, "0")
    wide, _ = load_model(folder, device="cpu", dtype="fp32")
    assert plan.kept_bf16(kept) and not plan.kept_bf16(wide)
    mask = kept.config.vocab_size - 1
    drafters = {id(m): random_drafter(m, mask, block_size=8) for m in (kept, wide)}
    options = lambda m, **o: DecodeOptions(exact=True, drafter=drafters[id(m)], **o)
    assert plan.COST_CUT is False  # the default: the threshold alone
    got = plan.plan_drafting(kept, options(kept))
    assert got.block_size == plan.TRAINED_BLOCK_BF16 == 4 and "cut to 4" in got.why and got.verify_costs == ()
    assert plan.plan_drafting(kept, options(kept, block_size=8)).block_size == 8  # as asked
    got = plan.plan_drafting(wide, options(wide))
    assert got.block_size == 8 and got.verify_costs == () and got.drafter_cost == plan.DRAFTER_COST
    monkeypatch.setattr(plan, "COST_CUT", True)
    got = plan.plan_drafting(kept, options(kept, block_size=8))
    assert got.verify_costs == plan.VERIFY_COSTS_CPU_BF16[:8] and got.drafter_cost == plan.DRAFTER_COST_BF16
    assert plan.verify_costs(kept, 18)[-2:] == (pytest.approx(4.05), pytest.approx(4.2))
    got = plan.plan_drafting(wide, options(wide))
    assert got.verify_costs[7] == pytest.approx(1 + 7 * plan.ROW_COST_CPU) and got.drafter_cost == plan.DRAFTER_COST

