"""Training checkpoints: written atomically, read back without unpickling code.

Layout of `RUN/checkpoints/step-00000123/`:
- `weights.safetensors`  the trainable parameters (all weights for full fine-tuning; LoRA and
  trainable-token parameters for LoRA), by the model's parameter names;
- `optimizer.pt`         `optimizer.state_dict()` (tensors and numbers only; read with
  `torch.load(weights_only=True)`); under FSDP one `optimizer-rank{r}.pt` per process;
- `rng.safetensors`      torch CPU (and CUDA) generator states;
- `state.json`           step, tokens seen, block size, data position, the recipe, world size.
A checkpoint is written into `.tmp-step-...` and renamed when complete, so a folder named
`step-*` with a `state.json` is always whole; `state.json` is the last file written. The staging
name is fixed (not nbdiff.fsutil's per-process temporary) because under FSDP every process writes
its optimizer shard into it.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nbdiff.errors import NBDiffError
from nbdiff.adapt.run_folder import CHECKPOINTS


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def weights(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path / "weights.safetensors"), device=str(device))

    def optimizer_state(self, rank: int = 0) -> dict[str, Any] | None:
        sharded = self.path / f"optimizer-rank{rank}.pt"
        path = sharded if sharded.is_file() else self.path / "optimizer.pt"
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def restore_rng(self) -> None:
        from safetensors.torch import load_file

        rng = load_file(str(self.path / "rng.safetensors"))
        torch.set_rng_state(rng["cpu"])
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                if f"cuda{i}" in rng:
                    torch.cuda.set_rng_state(rng[f"cuda{i}"], i)
        if "python" in self.state:
            version, internal, gauss = self.state["python"]
            random.setstate((version, tuple(internal), gauss))


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def staging_dir(run_dir: str | Path, step: int) -> Path:
    """The temporary folder a checkpoint is written into (every rank writes its part there)."""
    path = Path(run_dir) / CHECKPOINTS / f".tmp-{checkpoint_name(step)}"
    return path


def write_optimizer(staging: Path, optimizer_state: dict[str, Any], rank: int | None = None) -> None:
    staging.mkdir(parents=True, exist_ok=True)
    name = "optimizer.pt" if rank is None else f"optimizer-rank{rank}.pt"
    torch.save(optimizer_state, staging / name)


def finish_checkpoint(run_dir: str | Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any],
                      keep: int = 2) -> Path:
    """Write weights, RNG and state into the staging folder, rename it into place, prune old ones.

    Call on the main process after every rank has written its optimizer part into `staging_dir`.
    """
    from safetensors.torch import save_file

    staging = staging_dir(run_dir, step)
    staging.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, str(staging / "weights.safetensors"))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            rng[f"cuda{i}"] = torch.cuda.get_rng_state(i)
    save_file(rng, str(staging / "rng.safetensors"))
    version, internal, gauss = random.getstate()
    state = dict(state, step=step, python=[version, list(internal), gauss])
    (staging / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    final = Path(run_dir) / CHECKPOINTS / checkpoint_name(step)
    old = None
    if final.exists():  # the same step saved again: the old copy goes only once the new one is in place
        from nbdiff.fsutil import temp_sibling

        old = temp_sibling(final, "old")
        final.rename(old)
    staging.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    prune(run_dir, keep)
    return final


def folder_bytes(path: str | Path) -> int:
    """Bytes of the files under `path` (the size a checkpoint takes on disk)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def remove_checkpoints(run_dir: str | Path) -> None:
    """Delete every checkpoint of a run (`--prune-checkpoints` once the final model is written)."""
    shutil.rmtree(Path(run_dir) / CHECKPOINTS, ignore_errors=True)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    found = list_checkpoints(run_dir)
    if not found:
        return None
    return load_checkpoint(found[-1])


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise NBDiffError(f"checkpoint {path} is unreadable: {exc}", "delete it to resume from an older one") from None
    if not (path / "weights.safetensors").is_file():
        raise NBDiffError(f"checkpoint {path} has no weights.safetensors", "delete it to resume from an older one")
    return Checkpoint(path, state)


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints, and stale staging folders."""
    root = Path(run_dir) / CHECKPOINTS
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-step-*") if root.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)
