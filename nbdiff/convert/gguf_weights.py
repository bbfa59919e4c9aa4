"""A GGUF file's weights, dequantized one tensor at a time (`nbdiff convert model.gguf`).

Notable features:
- Nothing is dequantized up front: `GgufTensors.meta` (name, shape, dtype of every tensor the
  model gets) comes from the tensor table and a model built on the meta device, and `open()` gives
  a getter that dequantizes one tensor when the shard writer asks for it. Peak memory is a few
  tensors, not the model: the converter holds at most the tensor being written and its edited copy.
- The values are transformers' own: the same GGUF -> transformers name map
  (`get_gguf_hf_weights_map`), the same per-architecture tensor processor (llama.cpp's q/k row
  permutation undone for llama-family files), gguf's `dequantize`, the same cast. A test checks
  the written tensors equal `from_pretrained(..., gguf_file=...)`'s, bit for bit.
- The file is memory-mapped; each tensor is dequantized in row chunks (a few MB of temporaries
  instead of several copies of the tensor), and its mapped pages are dropped afterwards so a large
  file does not pile up in the resident set.
- Architectures whose tensors do not map one to one (mixture-of-experts files, whose expert
  tensors are split or merged, GPT-2's transposed output) and those transformers reads through
  its newer GGUF path are loaded whole by transformers instead (`streamable` says which).
"""

from __future__ import annotations

import contextlib
import mmap
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from nbdiff.errors import NBDiffError
from nbdiff.fsutil import quiet_transformers

# Rows of a quantized tensor dequantized at once: about this many values (16 MB in fp32), so the
# temporaries gguf's dequantize makes (several per value) stay small beside the tensor itself.
CHUNK_VALUES = 1 << 22

# transformers' tensor processors that map each GGUF tensor to one model tensor of the same name
# (their other ones split, merge or rename tensors inside `process`).
_ONE_TO_ONE = {
    "TensorProcessor", "LlamaTensorProcessor", "BloomTensorProcessor", "MambaTensorProcessor",
    "NemotronTensorProcessor", "Gemma2TensorProcessor",
}


def stream_gguf(path: Path, config, dtype: torch.dtype) -> "GgufTensors | None":
    """The file's tensors to read one by one, or None when `streamable` says transformers must load it."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))  # parsing the metadata takes seconds on a 150k-token vocabulary: once
    field = reader.fields["general.architecture"]
    architecture = bytes(field.parts[field.data[0]]).decode("utf-8")
    return GgufTensors(path, reader, architecture, config, dtype) if streamable(architecture) else None


def streamable(architecture: str) -> bool:
    """True when this module reproduces transformers' load of the architecture tensor by tensor."""
    from transformers.integrations.gguf.utils import is_gguf_arch_supported
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    if is_gguf_arch_supported(architecture):  # transformers' newer path: its own conversion ops
        return False
    return TENSOR_PROCESSORS.get(architecture, TensorProcessor).__name__ in _ONE_TO_ONE


class _Entry:
    """Where one GGUF tensor's bytes are, and what it becomes."""

    __slots__ = ("gguf_name", "tensor_type", "offset", "data_dtype", "data_shape")

    def __init__(self, tensor):
        self.gguf_name: str = tensor.name
        self.tensor_type = tensor.tensor_type
        self.offset = int(tensor.data_offset)
        self.data_dtype = tensor.data.dtype  # uint8 for block types, float32/float16/... otherwise
        self.data_shape = tuple(int(s) for s in tensor.data.shape)  # numpy order; blocks as bytes

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.data_shape, dtype=np.int64)) * self.data_dtype.itemsize


class GgufTensors:
    """The model tensors a GGUF file holds, in the model's state-dict order, read one at a time."""

    def __init__(self, path: Path, reader, architecture: str, config, dtype: torch.dtype):
        """`reader`: gguf's GGUFReader of `path`; `architecture`: its `general.architecture`."""
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, load_gguf_checkpoint,
        )

        self.path = Path(path)
        self.dtype = dtype
        with quiet_transformers():
            # the processor gets the config transformers parsed from the file, as in its own load
            parsed = load_gguf_checkpoint(str(self.path), return_tensors=False)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
        gguf_to_model = get_gguf_hf_weights_map(model, self.processor)
        # model key -> GGUF tensor; a later tensor of the same key wins, as in transformers' dict
        by_key = {gguf_to_model[t.name]: _Entry(t) for t in reader.tensors if t.name in gguf_to_model}
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        del model, reader
        self.entries = {k: by_key[k] for k in shapes if k in by_key}  # state-dict order
        self.meta = {k: (shapes[k], dtype) for k in self.entries}

    @contextlib.contextmanager
    def open(self) -> Iterator[Callable[[str], torch.Tensor]]:
        """A getter `key -> tensor` (shape as in the model, dtype as asked) over the mapped file."""
        with open(self.path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            yield lambda key: self._read(mapped, key)

    def _read(self, mapped: mmap.mmap, key: str) -> torch.Tensor:
        from gguf import dequantize

        entry = self.entries[key]
        count = int(np.prod(entry.data_shape, dtype=np.int64))
        raw = np.frombuffer(mapped, dtype=entry.data_dtype, count=count, offset=entry.offset).reshape(entry.data_shape)
        try:
            values = _dequantize_rows(raw, entry.tensor_type, dequantize)
        finally:
            del raw  # the mapping cannot close while a view of it is alive
            _drop_pages(mapped, entry.offset, entry.nbytes)
        result = self.processor.process(weights=values, name=entry.gguf_name, tensor_key_mapping={}, parsed_parameters={})
        # [rows, ...] float32; a processor may return a permuted view: made contiguous (one copy)
        tensor = torch.from_numpy(np.ascontiguousarray(result.weights))
        del values, result
        expected = self.meta[key][0]
        if tuple(tensor.shape) != expected:
            raise NBDiffError(
                f"{self.path.name}: tensor {entry.gguf_name} has shape {tuple(tensor.shape)}, "
                f"the model's {key} needs {expected}",
                "the file's metadata does not match its tensors; download it again",
            )
        return tensor.to(self.dtype)


def _dequantize_rows(raw: np.ndarray, tensor_type, dequantize) -> np.ndarray:
    """gguf's `dequantize` of `raw`, a chunk of rows at a time into one float32 array.

    Each block dequantizes on its own, so the chunks give the same values as one call.
    """
    from gguf.quants import quant_shape_from_byte_shape

    if raw.dtype != np.uint8 or raw.ndim < 2:  # plain floats (F32, F16): one copy
        return np.array(dequantize(raw, tensor_type), dtype=np.float32, copy=True)
    shape = quant_shape_from_byte_shape(raw.shape, tensor_type)  # blocks as bytes -> values
    rows_in = raw.reshape(-1, raw.shape[-1])  # [rows, bytes per row]
    out = np.empty((rows_in.shape[0], shape[-1]), dtype=np.float32)  # [rows, values per row]
    step = max(1, CHUNK_VALUES // max(1, shape[-1]))
    for start in range(0, rows_in.shape[0], step):
        out[start:start + step] = dequantize(rows_in[start:start + step], tensor_type)
    return out.reshape(shape)


def _drop_pages(mapped: mmap.mmap, offset: int, length: int) -> None:
    """Drop a read tensor's pages from the resident set (they stay in the page cache)."""
    if not hasattr(mmap, "MADV_DONTNEED"):  # pragma: no cover - not Linux
        return
    start = offset - offset % mmap.PAGESIZE
    end = min(len(mapped), offset + length)
    if end > start:
        with contextlib.suppress(OSError, ValueError):
            mapped.madvise(mmap.MADV_DONTNEED, start, end - start)
