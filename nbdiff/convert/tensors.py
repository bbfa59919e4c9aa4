"""Tensors in, shards out: where each input tensor lives, how it is written, and the shard plan.

Input is read one tensor at a time: a safetensors checkpoint through safe_open, a GGUF file through
`GgufTensors` (dequantized tensor by tensor), and never by instantiating the model. Output shards
are written tensor by tensor too: the safetensors header is known before any data (every shape
and dtype is planned), so each tensor is appended to its shard and freed. Peak memory is about two
copies of the largest tensor (the one read and its edited copy) whatever the model size, plus, for
safetensors input, the pages of the input shard being read (memory-mapped). The files
are byte for byte what safetensors' `save_file` writes for the same tensors (same header, same
order), which a test checks.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from nbdiff.errors import NBDiffError, first_line

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
Meta = tuple[tuple[int, ...], torch.dtype]  # (shape, dtype)


class TensorGroup:
    """One input unit read at a time: a safetensors file, a GGUF file, or an in-memory state dict."""

    def __init__(self, path: Path | None = None, state: dict[str, torch.Tensor] | None = None, gguf=None):
        self.path = path
        self.state = state
        self.gguf = gguf
        """A `GgufTensors`: meta from its table, tensors dequantized on demand."""
        self.meta: dict[str, Meta] = {}
        if state is not None:
            self.meta = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
        elif gguf is not None:
            self.meta = dict(gguf.meta)
        else:
            self.meta = _read_header(path)

    @contextlib.contextmanager
    def open(self) -> Iterator[Callable[[str], torch.Tensor]]:
        if self.state is not None:
            yield self.state.__getitem__
            return
        if self.gguf is not None:
            with self.gguf.open() as get:
                yield get
            return
        from safetensors import safe_open

        # The mapping is closed when the group is done, so its pages stop counting as ours.
        with safe_open(str(self.path), framework="pt") as f:
            def get(key: str) -> torch.Tensor:
                try:
                    return f.get_tensor(key)
                except Exception as exc:
                    raise NBDiffError(f"{self.path.name}: cannot read tensor {key} ({first_line(exc)})") from None

            yield get


def _read_header(path: Path) -> dict[str, Meta]:
    from safetensors import safe_open

    meta: dict[str, Meta] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                dtype = SAFETENSORS_DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise NBDiffError(f"{path.name}: tensor {key} has unsupported dtype {sl.get_dtype()}")
                meta[key] = (tuple(sl.get_shape()), dtype)
    except NBDiffError:
        raise
    except Exception as exc:
        raise NBDiffError(
            f"{path.name} is not a valid safetensors file ({first_line(exc)})",
            "the file is corrupt or truncated; download it again",
        ) from None
    return meta


def folder_groups(folder: Path) -> list[TensorGroup]:
    """The safetensors files of a folder, in index order (or sorted by name without an index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except Exception as exc:
            raise NBDiffError(f"{index} is not a valid safetensors index ({first_line(exc)})") from None
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise NBDiffError(f"{folder} lacks weight file {missing[0]} named in its index", "download the checkpoint again")
        files = [folder / n for n in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise NBDiffError(f"{folder} has no *.safetensors weights")
    return [TensorGroup(path=p) for p in files]


@dataclass
class OutputLayout:
    """How each written tensor looks: vocabulary-sized tensors gain rows, floats may change dtype."""

    located: dict[str, TensorGroup]
    """Key -> the input group holding it."""
    resized: set[str]
    """Keys whose first dimension is the vocabulary."""
    new_rows: int
    target: torch.dtype | None
    """Float dtype to write, or None to keep each tensor's own."""

    def meta(self, key: str) -> Meta:
        shape, dt = self.located[key].meta[key]
        if key in self.resized:
            shape = (self.new_rows, *shape[1:])
        if self.target is not None and dt.is_floating_point:
            dt = self.target
        return shape, dt

    def nbytes(self, key: str) -> int:
        shape, dt = self.meta(key)
        n = 1
        for s in shape:
            n *= s
        return n * dt.itemsize


@dataclass
class Shard:
    group: TensorGroup
    keys: list[str]
    name: str = ""


def plan_shards(groups: list[TensorGroup], layout: OutputLayout, skip: set[str], max_bytes: int) -> list[Shard]:
    """Cut each group's tensors (minus `skip`) into shards of at most `max_bytes` (one tensor may exceed it)."""
    shards: list[Shard] = []
    for g in groups:
        current: list[str] = []
        size = 0
        for key in g.meta:
            if key in skip:
                continue
            b = layout.nbytes(key)
            if current and size + b > max_bytes:
                shards.append(Shard(g, current))
                current, size = [], 0
            current.append(key)
            size += b
        if current:
            shards.append(Shard(g, current))
    for i, shard in enumerate(shards):
        shard.name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    return shards


def write_shards(
    shards: list[Shard],
    layout: OutputLayout,
    folder: Path,
    transform: Callable[[str, torch.Tensor], torch.Tensor],
    on_bytes: Callable[[int], None],
) -> None:
    """Write every shard into `folder` (plus the index when there are several), tensor by tensor.

    `transform(key, tensor)` edits a tensor before its dtype is set (the mask row); `on_bytes`
    receives the running byte count after each tensor.
    """
    weight_map: dict[str, str] = {}
    done = 0
    groups = list({id(s.group): s.group for s in shards}.values())  # input order
    for g in groups:
        with g.open() as get:
            for shard in (s for s in shards if s.group is g):
                metas = {key: layout.meta(key) for key in shard.keys}
                with open(folder / shard.name, "wb") as fh:
                    order = write_header(fh, metas, {"format": "pt"})
                    for key in order:  # the header's order, so the data is appended in place
                        t = transform(key, get(key))
                        dt = metas[key][1]
                        t = (t.to(dt) if t.dtype != dt else t).contiguous()
                        if tuple(t.shape) != metas[key][0]:  # pragma: no cover - planned from the same source
                            raise NBDiffError(f"tensor {key} has shape {tuple(t.shape)}, planned {metas[key][0]}")
                        write_data(fh, t)
                        del t
                        weight_map[key] = shard.name
                        done += layout.nbytes(key)
                        on_bytes(done)
        if g.state is not None:
            g.state.clear()  # free the dequantized weights as soon as they are written
    if len(shards) > 1:
        index = {"metadata": {"total_size": done}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


# safetensors' own data order: wider dtypes first (so every tensor is aligned), then by name
_DTYPE_ORDER = [torch.int64, torch.float64, torch.float32, torch.int32, torch.bfloat16, torch.float16,
                torch.int16, torch.int8, torch.uint8, torch.bool]
_SAFETENSORS_NAMES = {dt: name for name, dt in SAFETENSORS_DTYPES.items()}


def write_header(fh, metas: dict[str, Meta], metadata: dict[str, str]) -> list[str]:
    """Write a safetensors header for tensors `metas` (key -> (shape, dtype)); returns the data order.

    The layout is safetensors' own: an 8-byte little-endian header length, compact JSON with
    `__metadata__` first, padded with spaces to a multiple of 8, then the tensors back to back.
    """
    order = sorted(metas, key=lambda k: (_DTYPE_ORDER.index(metas[k][1]), k))
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for key in order:
        shape, dt = metas[key]
        size = dt.itemsize
        for s in shape:
            size *= s
        header[key] = {"dtype": _SAFETENSORS_NAMES[dt], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    fh.write(len(text).to_bytes(8, "little"))
    fh.write(text)
    return order


def write_data(fh, t: torch.Tensor) -> None:
    """Append a contiguous CPU tensor's bytes (no copy: numpy's view of its memory)."""
    fh.write(t.reshape(-1).view(torch.uint8).numpy().data)
