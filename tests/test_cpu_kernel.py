"""The small-row CPU kernel (nbdiff.cpu_kernel): products equal torch's to float rounding, each row
gets the same bits whatever rows share its product, the layer swap leaves models and checkpoints
alone, and a machine without a compiler or with the switch off keeps torch's product."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nbdiff import cpu_kernel

pytestmark = pytest.mark.skipif(cpu_kernel.cpu_isa() == 0 or cpu_kernel._compiler() is None,
                                reason="needs an x86 CPU with AVX2+FMA and a C++ compiler")
ISAS = [isa for isa in (1, 2) if isa <= cpu_kernel.cpu_isa()]
BF16 = cpu_kernel.cpu_isa() == 3  # AVX512-BF16: bf16 products too


@pytest.fixture(scope="module", autouse=True)
def ready():
    state = cpu_kernel.status()
    assert state.ready, state.reason


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k,n", [(1, 1), (7, 3), (16, 65), (33, 200), (576, 130)])
def test_products_match_torch(isa, k, n):
    gen = torch.Generator().manual_seed(k * 1000 + n)
    w, b = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
    for m in (0, 1, 2, 3, 5, 8, 9, 13, 16, 17, 34, 64, 71):  # above 4 rows AVX2 takes its many-row tiles
        x = torch.randn(m, k, generator=gen)
        for bias in (None, b):
            got = cpu_kernel.small_m_linear(x, w, bias, isa=isa)
            assert got.shape == (m, n)
            torch.testing.assert_close(got, F.linear(x, w, bias), rtol=1e-5, atol=1e-5 * k ** 0.5)


@pytest.mark.skipif(not BF16, reason="needs AVX512-BF16")
@pytest.mark.parametrize("k,n", [(1, 1), (31, 3), (32, 65), (600, 130)])
def test_bf16_products_match_torch_within_bf16_rounding(k, n):
    gen = torch.Generator().manual_seed(k + n)
    w, b = torch.randn(n, k, generator=gen).bfloat16(), torch.randn(n, generator=gen).bfloat16()
    for m in (0, 1, 3, 12, 17):
        x = torch.randn(m, k, generator=gen).bfloat16()
        for bias in (None, b):
            got = cpu_kernel.small_m_linear(x, w, bias, isa=3)
            exact = F.linear(x.float(), w.float(), None if bias is None else bias.float())
            assert got.dtype is torch.bfloat16 and got.shape == (m, n)
            # fp32 sums rounded once to bf16: within half a bf16 step of the exact product, as torch's
            torch.testing.assert_close(got.float(), exact, rtol=2 ** -8, atol=1e-5 * k)
            torch.testing.assert_close(got, F.linear(x, w, bias), rtol=2 ** -7, atol=1e-4 * k)
    with pytest.raises(RuntimeError, match="isa 3"):
        cpu_kernel.small_m_linear(x, w, None, isa=2)


@pytest.mark.parametrize("isa", ISAS + ([3] if BF16 else []))
@pytest.mark.parametrize("n,k", [(97, 200), (300, 1000)])  # 1000 features: several weight panels (AVX2's many-row path)
def test_each_row_gets_its_own_bits_whatever_shares_the_product(isa, n, k):
    gen = torch.Generator().manual_seed(1)
    dtype = torch.bfloat16 if isa == 3 else torch.float32
    rows = cpu_kernel.max_rows(dtype, isa)  # a prompt's rows too where the kernel takes them (AVX2: 64)
    w, b = torch.randn(n, k, generator=gen).to(dtype), torch.randn(n, generator=gen).to(dtype)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    alone = torch.cat([cpu_kernel.small_m_linear(x[i:i + 1], w, b, isa=isa) for i in range(rows)])
    for m in range(1, rows + 1):
        assert torch.equal(cpu_kernel.small_m_linear(x[:m], w, b, isa=isa), alone[:m]), m
    # a row keeps its bits beside different neighbours too
    mixed = torch.cat([x[5:6], torch.randn(6, k, generator=gen).to(dtype)])
    assert torch.equal(cpu_kernel.small_m_linear(mixed, w, b, isa=isa)[0], alone[5])


@pytest.mark.parametrize("isa", ISAS)
def test_several_weights_in_one_call_give_each_products_bits(isa):
    """small_m_linear_multi (a layer's q/k/v or gate/up in one call): each output is the single product's, bit for bit."""
    gen = torch.Generator().manual_seed(2)
    ws = [torch.randn(n, 72, generator=gen) for n in (40, 8, 8, 129)]
    bs = [torch.randn(40, generator=gen), None, torch.randn(8, generator=gen), None]
    for m in (1, 2, 5, 16, 17, 40):
        x = torch.randn(1, m, 72, generator=gen)
        got = torch.ops.nbdiff.small_m_linear_multi(x, ws, bs, isa)
        assert [y.shape for y in got] == [(1, m, w.shape[0]) for w in ws] and all(y.is_contiguous() for y in got)
        for y, w, b in zip(got, ws, bs):
            assert torch.equal(y, cpu_kernel.small_m_linear(x, w, b, isa=isa))
    meta = torch.ops.nbdiff.small_m_linear_multi(x.to("meta"), [w.to("meta") for w in ws], [None] * 4, isa)
    assert [y.shape for y in meta] == [y.shape for y in got]
    with pytest.raises(RuntimeError, match="one bias"):
        torch.ops.nbdiff.small_m_linear_multi(x, ws, bs[:2], isa)
    with pytest.raises(RuntimeError, match="x's K"):
        torch.ops.nbdiff.small_m_linear_multi(x, [torch.randn(4, 71)], [None], isa)


def test_shapes_views_and_refusals():
    w = torch.randn(24, 40)
    x = torch.randn(40, 2, 3).permute(1, 2, 0)  # (2, 3, 40), not contiguous
    torch.testing.assert_close(cpu_kernel.small_m_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="fp32 x with"):
        cpu_kernel.small_m_linear(x.double(), w.double())
    with pytest.raises(RuntimeError, match="features"):
        cpu_kernel.small_m_linear(torch.randn(2, 41), w)


def _linear(n=48, k=32, bias=True):
    layer = nn.Linear(k, n, bias=bias)
    cpu_kernel.install(nn.Sequential(layer))
    assert type(layer) is cpu_kernel.SmallRowsLinear
    return layer


def test_layer_takes_the_kernel_for_few_rows_only():
    layer = _linear()
    few, many = torch.randn(2, 4, 32), torch.randn(cpu_kernel.max_rows(torch.float32, cpu_kernel.cpu_isa()) + 1, 32)
    with torch.no_grad():
        assert torch.equal(layer(few), cpu_kernel.small_m_linear(few, layer.weight, layer.bias))
        assert torch.equal(layer(many), F.linear(many, layer.weight, layer.bias))
        half, few_half = _linear().to(torch.bfloat16), few.bfloat16()
        want = cpu_kernel.small_m_linear(few_half, half.weight, half.bias) if BF16 else F.linear(few_half, half.weight, half.bias)
        assert torch.equal(half(few_half), want)
        many_half = torch.randn(cpu_kernel.MAX_ROWS[torch.bfloat16] + 1, 32).bfloat16()
        assert torch.equal(half(many_half), F.linear(many_half, half.weight, half.bias))
        made = cpu_kernel.SmallRowsLinear(32, 48)  # not through install(): torch's product
        assert torch.equal(made(few), F.linear(few, made.weight, made.bias))
        wide = _linear().double()  # a dtype the kernel never takes
        assert torch.equal(wide(few.double()), F.linear(few.double(), wide.weight, wide.bias))
    # autograd wants torch's product: same bits as F.linear, and gradients flow
    out = layer(few)
    assert torch.equal(out, F.linear(few, layer.weight, layer.bias))
    out.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_install_keeps_the_model_its_state_and_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    from nbdiff.testing import tiny_model

    model = tiny_model("llama").eval()
    ids = torch.randint(0, model.config.vocab_size, (5, 14))  # 70 rows: above the kernel's limit on every ISA
    with torch.no_grad():
        before = model(ids).logits
        keys = list(model.state_dict())
        state = cpu_kernel.install(model)
        assert state.ready and state.isa == cpu_kernel.cpu_isa()
        swapped = [m for m in model.modules() if type(m) is cpu_kernel.SmallRowsLinear]
        assert len(swapped) == sum(1 for m in model.modules() if isinstance(m, nn.Linear))
        after = model(ids).logits  # torch's product
        step = model(ids[:1, :4]).logits  # 4 rows: the kernel
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    torch.testing.assert_close(step, before[:1, :4], rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert all(type(m) is not cpu_kernel.SmallRowsLinear for m in again.modules())
    cpu_kernel.uninstall(model)
    assert not any(type(m) is cpu_kernel.SmallRowsLinear for m in model.modules())


def test_load_model_installs_on_the_cpu_in_the_dtypes_it_takes(tiny_converted, monkeypatch):
    from nbdiff.loading import load_model

    model, _ = load_model(tiny_converted, device="cpu", dtype="fp32")
    assert model._nbdiff_cpu_kernel.ready
    assert any(type(m) is cpu_kernel.SmallRowsLinear for m in model.modules())
    model, _ = load_model(tiny_converted, device="cpu", dtype="bf16")
    assert model._nbdiff_cpu_kernel.ready == BF16
    assert any(type(m) is cpu_kernel.SmallRowsLinear for m in model.modules()) == BF16
    model, _ = load_model(tiny_converted, device="cpu", dtype="fp16")
    assert not model._nbdiff_cpu_kernel.ready and "no CPU linear layers in" in model._nbdiff_cpu_kernel.reason
    assert not any(type(m) is cpu_kernel.SmallRowsLinear for m in model.modules())
    monkeypatch.setenv(cpu_kernel.ENV_SWITCH, "0")
    model, _ = load_model(tiny_converted, device="cpu", dtype="fp32")
    assert not model._nbdiff_cpu_kernel.ready and "NBDIFF_CPU_KERNEL=0" in model._nbdiff_cpu_kernel.reason
    assert not any(type(m) is cpu_kernel.SmallRowsLinear for m in model.modules())


def test_build_is_reused_and_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    first = cpu_kernel.build(tmp_path / "ok")
    stamp = first.stat().st_mtime_ns
    assert cpu_kernel.build(tmp_path / "ok") == first and first.stat().st_mtime_ns == stamp
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(RuntimeError, match="false failed"):
        cpu_kernel.build(tmp_path / "bad")
    assert not list((tmp_path / "bad").rglob("*.so")) and not list((tmp_path / "bad").rglob("*.o"))


def test_describe_says_what_runs_without_building(tmp_path, monkeypatch):
    assert cpu_kernel.describe() == cpu_kernel.status().reason  # loaded in this process: its own words
    monkeypatch.setattr(cpu_kernel, "_status", None)
    monkeypatch.setenv("NBDIFF_HOME", str(tmp_path))  # nothing built there
    assert "first loaded" in cpu_kernel.describe() and not list(tmp_path.rglob("*.so"))
    assert cpu_kernel.needs_build()
    cpu_kernel.build(tmp_path / "kernels")
    assert not cpu_kernel.needs_build()
    assert cpu_kernel.describe().startswith(cpu_kernel.ISA_NAMES[cpu_kernel.cpu_isa()] + ", built;")
    monkeypatch.setenv(cpu_kernel.ENV_SWITCH, "0")
    assert cpu_kernel.describe() == "off (NBDIFF_CPU_KERNEL=0)"
    assert not cpu_kernel.needs_build()


def test_torch_compile_traces_the_layer():
    layer = _linear(n=24, k=40)
    x = torch.randn(3, 40)
    with torch.no_grad():
        want = layer(x)
        got = torch.compile(layer, backend="eager", fullgraph=True)(x)
        meta = torch.ops.nbdiff.small_m_linear(x.to("meta"), layer.weight.to("meta"), None, 1)
    assert torch.equal(got, want)
    assert meta.shape == (3, 24) and meta.device.type == "meta"


def test_a_cached_library_that_does_not_load_is_built_again(tmp_path, monkeypatch):
    first = cpu_kernel.build(tmp_path)
    first.write_bytes(b"not a shared library")  # a truncated or foreign file where ours should be
    loaded, errors = [], iter([OSError("Could not load this library"), None])

    def load(path):  # torch's loader fails on the bad file, as it does for real
        loaded.append(open(path, "rb").read(4))
        error = next(errors)
        if error is not None:
            raise error

    monkeypatch.setattr(torch.ops, "load_library", load)
    assert cpu_kernel.load_library(tmp_path) == first
    assert loaded == [b"not ", b"\x7fELF"]  # the bad file, then a fresh build in its place
