"""The adapt data pipeline: formats, chat loss masks, bad input, cache, packing, split, order."""

from __future__ import annotations

import json

import pytest
import torch

from adapt_helpers import TEXT, jsonl_file
from nbdiff.adapt.data import build_dataset, load_corpus, pack, render_chat, row_index
from nbdiff.errors import NBDiffError
from nbdiff.method.masks import packed_training_mask
from nbdiff.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(mask_token=True)


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello, how are you today?"},
    {"role": "assistant", "content": "I am fine, thank you."},
    {"role": "user", "content": "Once upon a time?"},
    {"role": "assistant", "content": "The quick brown fox."},
]


def test_text_jsonl_parquet_and_hf_dataset(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    jsonl_file(tmp_path / "b.jsonl", [{"text": "Hello, how are you today?"}, {"text": "Once upon a time."}])
    pq.write_table(pa.table({"text": ["The quick brown fox.", "I am fine."]}), tmp_path / "c.parquet")
    corpus = load_corpus([tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.parquet"], tok)
    assert corpus.num_documents == 5
    assert corpus.stats.files == 3
    first, train = corpus.document(0)
    assert tok.decode(first, skip_special_tokens=True) == TEXT
    assert int(first[-1]) == tok.eos_token_id  # documents end with EOS
    assert bool(train.all())

    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["a b c", "hello there"], "other": [1, 2]}).save_to_disk(str(tmp_path / "hf"))
    corpus = load_corpus([tmp_path / "hf"], tok)
    assert corpus.num_documents == 2


def test_gzip_json_lines_read_as_the_plain_file_and_a_torn_one_is_refused(tmp_path, tok):
    import gzip

    records = [{"messages": CHAT}, {"text": "Once upon a time."}, {"messages": CHAT[:3]}]
    plain = jsonl_file(tmp_path / "r.jsonl", records)
    packed = tmp_path / "r.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    a, b = load_corpus([plain], tok), load_corpus([packed], tok)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.trainable, b.trainable) and b.num_documents == 3
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "part-1.jsonl.gz").write_bytes(packed.read_bytes())
    assert load_corpus([folder], tok).num_documents == 3  # a folder of shards finds them
    torn = tmp_path / "torn.jsonl.gz"
    torn.write_bytes(packed.read_bytes()[:-12])
    with pytest.raises(NBDiffError, match="not a whole gzip file"):
        load_corpus([torn], tok)


def test_chat_losses_only_on_assistant_tokens(tok):
    ids, trainable = render_chat(CHAT, tok)
    full = tok.apply_chat_template(CHAT, tokenize=False)
    assert tok.decode(ids) == full
    trained = tok.decode([i for i, t in zip(ids, trainable) if t])
    assert trained == "I am fine, thank you.<|im_end|>\nThe quick brown fox.<|im_end|>\n"
    untrained = tok.decode([i for i, t in zip(ids, trainable) if not t])
    assert "Hello, how are you today?" in untrained and "Be brief." in untrained
    assert "assistant" in untrained  # the role header is prompt, not target


def test_chat_jsonl_packs_with_prompt_untrained(tmp_path, tok):
    path = jsonl_file(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[:3]}])
    ds = build_dataset([path], tok, seq_len=32, seed=0, eval_fraction=0)
    rows = ds.train
    # every trained token is an assistant token: compare with the per-conversation rendering
    expected = sum(sum(render_chat(m, tok)[1]) for m in (CHAT, CHAT[:3]))
    assert int(rows.trainable.sum()) == expected
    assert int(rows.trainable.sum()) < rows.real_tokens


def test_empty_and_non_utf8_are_skipped_with_counts(tmp_path, tok):
    (tmp_path / "good.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "lines.jsonl").write_bytes(b'{"text": "ok line"}\n{"text": "\xff\xfe bad"}\n{"text": ""}\nnot json\n')
    corpus = load_corpus([tmp_path], tok)
    s = corpus.stats
    assert corpus.num_documents == 2
    assert s.skipped_empty == 2 and s.skipped_non_utf8 == 3
    assert s.files == 4


def test_nothing_usable_is_a_clear_error(tmp_path, tok):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(NBDiffError, match="no usable training text"):
        load_corpus([tmp_path / "empty.txt"], tok)
    jsonl_file(tmp_path / "wrong.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(NBDiffError, match="`text`") as err:
        load_corpus([tmp_path / "wrong.jsonl"], tok)
    assert "wrong.jsonl" in str(err.value)
    with pytest.raises(NBDiffError, match="does not exist"):
        load_corpus([tmp_path / "missing.txt"], tok)
    (tmp_path / "x.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(NBDiffError, match="unknown data file type"):
        load_corpus([tmp_path / "x.csv"], tok)


def test_cache_is_reused_and_invalidated(tmp_path, tok):
    path = tmp_path / "a.txt"
    path.write_text(TEXT, encoding="utf-8")
    cache = tmp_path / "cache"
    first = load_corpus([path], tok, cache)
    assert first.stats.cached_files == 0 and len(list(cache.iterdir())) == 1
    again = load_corpus([path], tok, cache)
    assert again.stats.cached_files == 1
    assert torch.equal(first.tokens, again.tokens)
    path.write_text(TEXT + " Once upon a time.", encoding="utf-8")
    changed = load_corpus([path], tok, cache)
    assert changed.stats.cached_files == 0 and changed.tokens.numel() > first.tokens.numel()


def test_packing_restarts_positions_and_keeps_documents_apart(tmp_path, tok):
    jsonl_file(tmp_path / "d.jsonl", [{"text": TEXT[: 20 + 9 * i]} for i in range(6)])
    corpus = load_corpus([tmp_path / "d.jsonl"], tok)
    rows = pack(corpus, seq_len=16, seed=3, pad_id=tok.pad_token_id)
    assert rows.input_ids.shape[1] == 16
    # every token is kept, in some row, exactly once (plus padding in the last row only)
    assert rows.real_tokens == corpus.tokens.numel()
    assert int((rows.doc_ids[:-1] < 0).sum()) == 0
    for r in range(len(rows)):
        pos, docs = rows.position_ids[r], rows.doc_ids[r]
        starts = torch.ones_like(docs, dtype=torch.bool)
        starts[1:] = docs[1:] != docs[:-1]
        assert bool((pos[starts] == 0).all())  # positions restart at each document piece
        assert bool((pos[1:][~starts[1:]] == pos[:-1][~starts[1:]] + 1).all())
    # the training mask built from these ids never crosses a document boundary
    m = packed_training_mask(rows.position_ids[:1], rows.doc_ids[:1], 4)[0]
    docs = rows.doc_ids[0]
    cross = docs[:, None] != docs[None, :]
    assert not bool(m[:16, :16][cross].any()) and not bool(m[16:, 16:][cross].any())


def test_eval_split_and_seeded_order(tmp_path, tok):
    (tmp_path / "a.txt").write_text(" ".join(str(i) for i in range(300)), encoding="utf-8")  # no repeated rows
    ds = build_dataset([tmp_path / "a.txt"], tok, seq_len=16, seed=0, eval_fraction=0.1, eval_max_rows=4)
    assert ds.eval is not None and len(ds.eval) == 4
    n = len(ds.train)
    train_rows = {tuple(r.tolist()) for r in ds.train.input_ids}
    assert not any(tuple(r.tolist()) in train_rows for r in ds.eval.input_ids)
    epoch0 = [row_index(k, n, seed=7) for k in range(n)]
    epoch1 = [row_index(n + k, n, seed=7) for k in range(n)]
    assert sorted(epoch0) == list(range(n)) == sorted(epoch1)
    assert epoch0 != epoch1
    assert epoch0 == [row_index(k, n, seed=7) for k in range(n)]  # a position is just an integer
