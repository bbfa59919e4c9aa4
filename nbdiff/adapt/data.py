"""The data pipeline of `nbdiff adapt`: read, tokenise once (cached), pack, split, order.

Notable features:
- Formats: plain text (.txt, .md, .text: one file = one document); .jsonl with a `text` field or
  a chat `messages` field; .parquet with the same columns; a folder written by Hugging Face
  `datasets.save_to_disk` (the `train` split, or every split); any other folder = the files inside.
- Chat records are rendered with the tokenizer's chat template, and only assistant tokens are loss
  targets (`trainable`): the prompt is never masked and never predicted, so both L_MDM and L_AR
  fall on assistant tokens only.
- Tokenised once: each input file is cached as safetensors keyed by the file's content hash, the
  tokenizer (vocabulary, template) and the pipeline version.
- Packing: documents (shuffled with the seed) are streamed into rows of `seq_len`; a document that
  does not fit is cut and continues on the next row. Position ids restart at every document and at
  every cut, and doc ids tell `nbdiff.method.masks.packed_training_mask` to keep documents apart. Only the
  last row is padded (pad = its own document, never a loss target).
- Held-out split: the last rows of the packed stream (eval rows never appear in training).
- Order: row `k` of the infinite training stream is `perm_e[k % N]` with `e = k // N` and `perm_e`
  a seeded permutation, so a data position is just an integer and resume is exact.
- Bad input: empty documents and non-UTF-8 files or lines are skipped and counted; a record
  without the expected field is counted, and a file where nothing usable is left is an error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from nbdiff.errors import NBDiffError
from nbdiff.fsutil import atomic_file

PIPELINE_VERSION = "1"
TEXT_SUFFIXES = (".txt", ".md", ".text")
DATA_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".jsonl.gz", ".parquet")


def data_suffix(path: Path) -> str:
    """The data kind a file name says: its suffix, or '.jsonl.gz' for gzip-compressed JSON lines."""
    name = path.name.lower()
    return ".jsonl.gz" if name.endswith(".jsonl.gz") else path.suffix.lower()


@dataclass
class DataStats:
    """What reading the data found; skipped items are counted, never silent."""

    files: int = 0
    documents: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    skipped_empty: int = 0
    """Documents with no text."""
    skipped_non_utf8: int = 0
    """Files or lines that are not valid UTF-8 (or not valid JSON)."""
    skipped_no_field: int = 0
    """Records without a `text` or `messages` field, or with one of the wrong type."""
    skipped_no_assistant: int = 0
    """Chat records with no assistant token to train on."""
    cached_files: int = 0
    """Files read from the tokenisation cache."""

    def add(self, other: "DataStats") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def skipped(self) -> int:
        return self.skipped_empty + self.skipped_non_utf8 + self.skipped_no_field + self.skipped_no_assistant


@dataclass
class Corpus:
    """Tokenised documents, flat: document d is tokens[offsets[d]:offsets[d+1]]."""

    tokens: torch.Tensor  # int64 [T]
    trainable: torch.Tensor  # bool [T], True = a loss target
    offsets: torch.Tensor  # int64 [D + 1]
    stats: DataStats = field(default_factory=DataStats)

    @property
    def num_documents(self) -> int:
        return int(self.offsets.numel()) - 1

    def document(self, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = int(self.offsets[d]), int(self.offsets[d + 1])
        return self.tokens[a:b], self.trainable[a:b]


@dataclass
class PackedRows:
    """Packed rows; every tensor is [N, L]."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    """Position inside the document piece; restarts at 0 per document and per cut."""
    doc_ids: torch.Tensor
    """Equal ids = same document piece (padding is its own piece)."""
    trainable: torch.Tensor
    """bool: the token is a loss target (False for padding and chat prompts)."""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, index) -> "PackedRows":
        return PackedRows(self.input_ids[index], self.position_ids[index], self.doc_ids[index], self.trainable[index])

    @property
    def real_tokens(self) -> int:
        return int((self.doc_ids >= 0).sum())


@dataclass
class Dataset:
    """What the trainer consumes: training rows, held-out rows and the reading statistics."""

    train: PackedRows
    eval: PackedRows | None
    stats: DataStats
    seq_len: int


# ----------------------------------------------------------------------------- reading


def expand_paths(paths: list[str | Path]) -> list[Path]:
    """Files and dataset folders named by `paths` (folders of files are expanded, sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise NBDiffError(f"data path {p} does not exist", "pass text, .jsonl, .parquet files or folders")
        if p.is_dir():
            if _is_hf_dataset(p):
                out.append(p)
                continue
            found = sorted(f for f in p.rglob("*") if f.is_file() and data_suffix(f) in DATA_SUFFIXES)
            if not found:
                raise NBDiffError(f"data folder {p} holds no data files",
                                  f"expected {', '.join(DATA_SUFFIXES)} files or a `datasets.save_to_disk` folder")
            out.extend(found)
        else:
            if data_suffix(p) not in DATA_SUFFIXES:
                raise NBDiffError(f"unknown data file type: {p.name}",
                                  f"use {', '.join(DATA_SUFFIXES)} or a saved Hugging Face dataset folder")
            out.append(p)
    if not out:
        raise NBDiffError("no training data given", "pass --data FILE (repeat --data for several)")
    return out


def _is_hf_dataset(p: Path) -> bool:
    return any((p / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def open_lines(path: Path):
    """A JSON-lines data file opened for reading bytes, through gzip where its name says `.jsonl.gz`."""
    import gzip

    return gzip.open(path, "rb") if data_suffix(path) == ".jsonl.gz" else path.open("rb")


def _records_jsonl(path: Path, stats: DataStats) -> Iterator[dict]:
    import gzip
    import zlib

    try:
        yield from _json_lines(open_lines(path), stats)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:  # only a gzip stream raises these
        raise NBDiffError(f"{path} is not a whole gzip file ({exc})", "compress the JSON lines again (gzip FILE.jsonl)") from None


def _json_lines(fh, stats: DataStats) -> Iterator[dict]:
    with fh:
        for raw in fh:
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                stats.skipped_non_utf8 += 1
                continue
            if not isinstance(rec, dict):
                stats.skipped_no_field += 1
                continue
            yield rec


def _records_parquet(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    cols = [c for c in ("messages", "text") if c in table.column_names]
    if not cols:
        raise NBDiffError(f"{path} has no `text` or `messages` column",
                          f"its columns are: {', '.join(table.column_names)}")
    yield from table.select(cols).to_pylist()


def _records_hf(path: Path) -> Iterator[dict]:
    try:
        import datasets
    except ImportError:
        raise NBDiffError("reading a saved Hugging Face dataset needs the `datasets` package",
                          "pip install datasets") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        parts = [ds["train"]] if "train" in ds else [ds[k] for k in sorted(ds)]
    else:
        parts = [ds]
    for part in parts:
        cols = [c for c in ("messages", "text") if c in part.column_names]
        if not cols:
            raise NBDiffError(f"dataset {path} has no `text` or `messages` column",
                              f"its columns are: {', '.join(part.column_names)}")
        yield from part.select_columns(cols)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about the tokenizer that changes token ids."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    h.update(repr((tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer))).encode())
    return h.hexdigest()[:16]


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:24]


def _encode_texts(texts: list[str], tokenizer) -> list[list[int]]:
    if not texts:
        return []
    out = []
    eos = tokenizer.eos_token_id
    for ids in tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]:
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]  # the model learns where a document ends
        out.append(ids)
    return out


def _encode_text(text: str, tokenizer) -> list[int]:
    return _encode_texts([text], tokenizer)[0]


def _flat(docs: list[list], dtype) -> torch.Tensor:
    import numpy as np

    if not docs:
        return torch.zeros(0, dtype=dtype)
    np_dtype = np.int64 if dtype == torch.int64 else np.bool_
    return torch.from_numpy(np.concatenate([np.asarray(d, dtype=np_dtype) for d in docs]))


def render_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation through the chat template, and which ones are assistant tokens.

    The span of assistant message i runs from the end of the template rendering of messages[:i]
    with the generation prompt to the end of the rendering of messages[:i+1] (its content and
    end-of-turn tokens). Tokens are mapped to spans through the fast tokenizer's offsets.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise NBDiffError("chat data needs a tokenizer with a chat template", "use `text` records instead")
    if not getattr(tokenizer, "is_fast", False):
        raise NBDiffError("chat data needs a fast tokenizer (for token offsets)")

    def render(msgs, gen=False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages)
    spans = []
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        try:
            start = len(render(messages[:i], gen=True)) if i else None
        except Exception:
            start = None
        end_text = render(messages[: i + 1])
        if start is None or not full.startswith(end_text) or start > len(end_text):
            continue  # template does not render prefixes as prefixes: leave this turn untrained
        spans.append((start, len(end_text)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    trainable = [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), trainable


def _valid_messages(msgs: Any) -> bool:
    return isinstance(msgs, list) and bool(msgs) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
    )


def _tokenize_file(path: Path, tokenizer) -> tuple[list[list[int]], list[list[bool]], DataStats]:
    """Token ids and loss-target masks of every document in one input (a text file is one document)."""
    stats = DataStats(files=1)
    suffix = data_suffix(path)
    if path.is_file() and suffix in TEXT_SUFFIXES:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            stats.skipped_non_utf8 += 1
            return [], [], stats
        if not text.strip():
            stats.skipped_empty += 1
            return [], [], stats
        ids = _encode_text(text, tokenizer)
        return [ids], [[True] * len(ids)], stats
    if path.is_dir():
        records: Iterator[dict] = _records_hf(path)
    elif suffix in (".jsonl", ".jsonl.gz"):
        records = _records_jsonl(path, stats)
    else:
        records = _records_parquet(path)
    docs, masks = _tokenize_records(records, tokenizer, stats)
    if not docs and stats.skipped_no_field:
        raise NBDiffError(f"{path} has no record with a `text` (string) or `messages` (chat list) field",
                          'each line should look like {"text": "..."} or {"messages": [{"role": ..., "content": ...}]}')
    return docs, masks, stats


def _tokenize_records(records: Iterator[dict], tokenizer, stats: DataStats) -> tuple[list[list[int]], list[list[bool]]]:
    """Chat records through the template (assistant tokens trainable); text records in batches of 512."""
    docs: list[list[int]] = []
    masks: list[list[bool]] = []
    pending: list[str] = []  # text records are tokenised in batches (much faster than one call each)

    def flush() -> None:
        for ids in _encode_texts(pending, tokenizer):
            docs.append(ids)
            masks.append([True] * len(ids))
        pending.clear()

    for rec in records:
        if "messages" in rec and rec["messages"] is not None:
            if not _valid_messages(rec["messages"]):
                stats.skipped_no_field += 1
                continue
            ids, trainable = render_chat(rec["messages"], tokenizer)
            if not any(trainable):
                stats.skipped_no_assistant += 1
                continue
            docs.append(ids)
            masks.append(trainable)
        elif "text" in rec:
            text = rec["text"]
            if not isinstance(text, str):
                stats.skipped_no_field += 1
            elif not text.strip():
                stats.skipped_empty += 1
            else:
                pending.append(text)
                if len(pending) >= 512:
                    flush()
        else:
            stats.skipped_no_field += 1
    flush()
    return docs, masks


def _save_cache(path: Path, docs, masks, stats: DataStats) -> None:
    from safetensors.torch import save_file

    lengths = torch.tensor([len(d) for d in docs], dtype=torch.int64)
    offsets = torch.zeros(len(docs) + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    tokens = _flat(docs, torch.int64)
    trainable = _flat(masks, torch.bool)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:  # a cache file is complete or absent; runs sharing a cache never share a temp
        save_file({"tokens": tokens, "trainable": trainable.to(torch.uint8), "offsets": offsets}, str(tmp),
                  metadata={"stats": json.dumps(stats.__dict__)})


def _load_cache(path: Path) -> Corpus | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            stats = DataStats(**json.loads(fh.metadata()["stats"]))
            return Corpus(fh.get_tensor("tokens"), fh.get_tensor("trainable").bool(), fh.get_tensor("offsets"), stats)
    except Exception:  # a corrupt cache is rebuilt, never trusted
        return None


def load_corpus(paths: list[str | Path], tokenizer, cache_dir: str | Path | None = None) -> Corpus:
    """Tokenise every input (through the cache when `cache_dir` is given) into one Corpus."""
    fp = tokenizer_fingerprint(tokenizer)
    parts: list[Corpus] = []
    total = DataStats()
    for path in expand_paths(paths):
        cache = None
        if cache_dir is not None:
            key = hashlib.sha256(f"{PIPELINE_VERSION}|{fp}|{_file_hash(path)}".encode()).hexdigest()[:32]
            cache = Path(cache_dir) / f"{path.name}-{key}.safetensors"
        part = _load_cache(cache) if cache is not None and cache.is_file() else None
        if part is not None:
            part.stats.cached_files = 1
        else:
            docs, masks, stats = _tokenize_file(path, tokenizer)
            if cache is not None:
                _save_cache(cache, docs, masks, stats)
                part = _load_cache(cache)
            if part is None:
                offsets = torch.zeros(len(docs) + 1, dtype=torch.int64)
                offsets[1:] = torch.tensor([len(d) for d in docs], dtype=torch.int64).cumsum(0)
                part = Corpus(_flat(docs, torch.int64), _flat(masks, torch.bool), offsets, stats)
        parts.append(part)
        total.add(part.stats)
    tokens = torch.cat([p.tokens for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
    trainable = torch.cat([p.trainable for p in parts]) if parts else torch.zeros(0, dtype=torch.bool)
    offsets = [torch.zeros(1, dtype=torch.int64)]
    base = 0
    for p in parts:
        offsets.append(p.offsets[1:] + base)
        base += int(p.offsets[-1])
    corpus = Corpus(tokens, trainable, torch.cat(offsets), total)
    total.documents = corpus.num_documents
    total.tokens = int(tokens.numel())
    total.trainable_tokens = int(trainable.sum())
    if corpus.num_documents == 0 or total.trainable_tokens == 0:
        raise NBDiffError(
            f"no usable training text left (skipped: {total.skipped_empty} empty, {total.skipped_non_utf8} "
            f"not UTF-8, {total.skipped_no_field} without a text/messages field, "
            f"{total.skipped_no_assistant} chats without assistant turns)",
            "check the --data files",
        )
    return corpus


# ----------------------------------------------------------------------------- packing


def pack(corpus: Corpus, seq_len: int, seed: int, pad_id: int) -> PackedRows:
    """Stream documents (seeded order) into rows of seq_len; cut documents that do not fit."""
    order = torch.randperm(corpus.num_documents, generator=torch.Generator().manual_seed(seed)).tolist()
    ids, pos, docs, train = [], [], [], []
    piece = 0
    row_fill = 0
    for d in order:
        toks, tr = corpus.document(d)
        start = 0
        while start < toks.numel():
            take = min(seq_len - row_fill, toks.numel() - start)
            ids.append(toks[start:start + take])
            pos.append(torch.arange(take, dtype=torch.int64))
            docs.append(torch.full((take,), piece, dtype=torch.int64))
            train.append(tr[start:start + take])
            piece += 1
            start += take
            row_fill = (row_fill + take) % seq_len
    if row_fill:  # pad the last row; padding is its own "document" (-1) and never a target
        n = seq_len - row_fill
        ids.append(torch.full((n,), pad_id, dtype=torch.int64))
        pos.append(torch.arange(n, dtype=torch.int64))
        docs.append(torch.full((n,), -1, dtype=torch.int64))
        train.append(torch.zeros(n, dtype=torch.bool))
    rows = lambda parts: torch.cat(parts).view(-1, seq_len)  # noqa: E731
    return PackedRows(rows(ids), rows(pos), rows(docs), rows(train))


def build_dataset(paths: list[str | Path], tokenizer, seq_len: int, seed: int, eval_fraction: float = 0.05,
                  eval_max_rows: int = 16, cache_dir: str | Path | None = None, pad_id: int | None = None) -> Dataset:
    """Read, tokenise (cached), pack and split the data. Eval rows are the last rows of the packed stream."""
    corpus = load_corpus(paths, tokenizer, cache_dir)
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rows = pack(corpus, seq_len, seed, pad_id)
    n_eval = 0
    if eval_fraction > 0 and len(rows) >= 2 and eval_max_rows > 0:
        n_eval = min(eval_max_rows, max(1, round(eval_fraction * len(rows))), len(rows) - 1)
    n_train = len(rows) - n_eval
    train = rows.select(slice(0, n_train))
    ev = rows.select(slice(n_train, None)) if n_eval else None
    return Dataset(train=train, eval=ev, stats=corpus.stats, seq_len=seq_len)


def slot_generator(seed: int, slot: int) -> torch.Generator:
    """The noise generator of one row slot of the training stream (independent of process layout)."""
    return torch.Generator().manual_seed((seed * 6364136223846793005 + slot * 1442695040888963407 + 1) % 2**63)


def row_index(slot: int, num_rows: int, seed: int) -> int:
    """Row of the infinite training stream at position `slot`: a fresh seeded permutation per epoch."""
    epoch, k = divmod(slot, num_rows)
    perm = _epoch_perm(num_rows, seed, epoch)
    return int(perm[k])


_PERM_CACHE: dict[tuple[int, int, int], torch.Tensor] = {}


def _epoch_perm(num_rows: int, seed: int, epoch: int) -> torch.Tensor:
    key = (num_rows, seed, epoch)
    if key not in _PERM_CACHE:
        if len(_PERM_CACHE) > 8:
            _PERM_CACHE.clear()
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        _PERM_CACHE[key] = torch.randperm(num_rows, generator=g)
    return _PERM_CACHE[key]
