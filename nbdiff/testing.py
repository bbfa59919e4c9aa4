"""Tiny random models and a tiny real tokenizer, for tests, benchmarks and examples.

`tiny_model("qwen3")` is one line; nothing is downloaded. The tokenizer is a byte-level BPE
trained in memory on a few hundred words, with ChatML special tokens and a chat template, so the
chat, convert and adapt paths run exactly as they do on a real checkpoint.
"""

from __future__ import annotations

import torch

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")

_TRAIN_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters. def add(a, b):\n    return a + b\n1 + 2 = 3. 12 * 4 = 48. The quick brown fox "
    "jumps over the lazy dog. Hello, how are you today? I am fine, thank you. Once upon a time."
)

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 384, mask_token: bool = False):
    """A PreTrainedTokenizerFast (byte-level BPE) with <|endoftext|>, <|im_start|>, <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TRAIN_TEXT] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    if mask_token:
        fast.add_special_tokens({"mask_token": "<|mask|>"})
    return fast


def tiny_config(arch: str = "llama", vocab_size: int = 384, **overrides):
    """A small transformers config of the given family (about 0.3M parameters by default)."""
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}")
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=arch in ("qwen2", "qwen3"),
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch == "qwen3":
        kwargs["head_dim"] = 16
    if arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    config = AutoConfig.for_model(arch, **kwargs)
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    return config


def tiny_model(arch: str = "llama", seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    """A random-weight causal LM of the given family, in eval mode, fp32."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
        # random init is small; scale up so different inputs give clearly different logits
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.08)
    return model.eval()


def lean_pair(arch: str = "llama", **overrides):
    """(lean, reference): one tiny model twice, both with the CPU kernel's products, the first with the lean
    forward (nbdiff.cpu_kernel.fast_forward), the second with transformers' own; for comparing their bits."""
    import copy

    from nbdiff import cpu_kernel
    from nbdiff.cpu_kernel import fast_forward

    lean = tiny_model(arch, **overrides)
    reference = copy.deepcopy(lean)
    assert cpu_kernel.install(reference, fast_forward=False).ready and not fast_forward.installed(reference)
    assert cpu_kernel.install(lean).ready and fast_forward.installed(lean)
    return lean, reference


def save_tiny_checkpoint(path, arch: str = "llama", seed: int = 0, **overrides):
    """Write a plain (unconverted) Hugging Face folder: tiny model + tiny tokenizer."""
    tok = tiny_tokenizer()
    model = tiny_model(arch, seed=seed, vocab_size=len(tok), **overrides)
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_converted(path, arch: str = "llama", *, block_size: int = 4, adapted: int = 1, mask: str = "added",
                        seed: int = 0, dtype: torch.dtype | None = None, **overrides):
    """Write a tiny folder as `nbdiff convert` (or adapt, with `adapted` > 1) leaves it, without running convert.

    `mask="added"`: `<|mask|>` is added to the tokenizer, as convert does (vocabulary 385).
    `mask="last"`: the last vocabulary id serves as the mask and the tokenizer is unchanged (384).
    The weights are those of `save_tiny_checkpoint` with the same seed and vocabulary (rounded to `dtype`
    where given: a folder stored in bf16, as most checkpoints are).
    """
    from pathlib import Path

    from nbdiff.method.settings import BlockDiffusionSettings, attach_settings

    if mask not in ("added", "last"):
        raise ValueError("mask must be 'added' or 'last'")
    tok = tiny_tokenizer(mask_token=mask == "added")
    model = tiny_model(arch, seed=seed, vocab_size=len(tok), **overrides)
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    mask_id = tok.mask_token_id if mask == "added" else len(tok) - 1
    attach_settings(model.config, BlockDiffusionSettings(
        block_size=block_size, mask_token_id=mask_id, mask_token="<|mask|>", adapted_block_size=adapted, source="tiny"))
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def random_drafter(model, mask_token_id: int, block_size: int = 8, seed: int = 0):
    """An untrained drafter for `model` with weights far from their init, so its drafts are some fixed
    function of the context features (tests of drafting and verification need drafts that are sometimes
    right and sometimes wrong, without training)."""
    from nbdiff.drafter import DrafterConfig, new_drafter

    drafter = new_drafter(DrafterConfig.for_target(model, block_size=block_size, mask_token_id=mask_token_id), model)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for p in drafter.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.2)
    return drafter.eval()
