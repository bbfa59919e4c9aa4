"""A trained drafter for llama.cpp: the folder its `convert_hf_to_gguf.py` turns into a `dflash` GGUF.

nbdiff's drafter folders already use DFlash's tensor names and config (nbdiff.drafter.folder), so
llama.cpp's converter reads one as it stands (`convert_hf_to_gguf.py DRAFTER --target-model-dir
MODEL`). What it does not read is nbdiff's reduced draft vocabulary (`nbdiff_drafter.draft_vocab`):
converted as is, llama.cpp would draft from the target's whole LM head, which keeps fewer drafts
(docs/benchmarks/llamacpp-drafter.md: 1.38 against 1.42 tokens per verify on SmolLM2, in both
engines alike). llama.cpp's DFlash graph can take a reduced vocabulary, as a `d2t` table (draft row
i drafts target id i + d2t[i]) with the target head's rows of those ids as the drafter's own
`lm_head.weight` [Vd, H], but its converter reads these only from the DSpark-style layout
(`draft_vocab_size` in config.json, architecture `DSparkDraftModel`). `export_for_llamacpp`
writes that layout; without a Markov head it converts to the same plain `dflash` GGUF.

The target's head is read from its safetensors (the embedding where the two are tied); nothing
else of the target is copied. The folder is written whole or not at all (nbdiff.fsutil.atomic_dir).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nbdiff.errors import NBDiffError

VOCABS = ("draft", "full")


def _target_head(target_dir: Path) -> torch.Tensor:
    """The target's LM head [V, H] from its safetensors (its embedding when the two are tied)."""
    from safetensors import safe_open

    config_path = target_dir / "config.json"
    if not config_path.is_file():
        raise NBDiffError(f"{target_dir} has no config.json", "pass the model folder the drafter was trained for")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    names = ([] if config.get("tie_word_embeddings") else ["lm_head.weight"]) + ["model.embed_tokens.weight"]
    for part in sorted(target_dir.glob("*.safetensors")):
        with safe_open(str(part), framework="pt") as f:
            for name in names:
                if name in f.keys():
                    return f.get_tensor(name)
    raise NBDiffError(f"{target_dir}: no {' or '.join(names)} in its safetensors",
                      "pass the model folder the drafter was trained for (nbdiff convert's output)")


def export_for_llamacpp(drafter_dir, target_dir, out, vocab: str = "draft") -> Path:
    """Write `out`: `drafter_dir` in the layout llama.cpp's converter reads. vocab 'draft' gives llama.cpp
    the drafter's reduced vocabulary (`d2t`, `lm_head.weight`, `draft_vocab_size`); 'full', or a drafter
    without one, copies the folder as it is. `out` must not exist or be empty."""
    from safetensors.torch import load_file, save_file

    from nbdiff.drafter.folder import is_drafter_folder
    from nbdiff.fsutil import atomic_dir

    drafter_dir, target_dir, out = Path(drafter_dir), Path(target_dir), Path(out)
    if vocab not in VOCABS:
        raise NBDiffError(f"unknown vocabulary {vocab!r}", f"pick one of {', '.join(VOCABS)}")
    if not is_drafter_folder(drafter_dir):
        raise NBDiffError(f"{drafter_dir} is not a drafter folder (model.safetensors and config.json)",
                          "pass the folder `nbdiff adapt MODEL --target drafter` wrote")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NBDiffError(f"{out} exists and is not empty", "pick a new folder; nbdiff does not overwrite it")
    config = json.loads((drafter_dir / "config.json").read_text(encoding="utf-8"))
    tensors = load_file(str(drafter_dir / "model.safetensors"))
    ids = (config.get("nbdiff_drafter") or {}).get("draft_vocab")
    if vocab == "draft" and ids:
        head = _target_head(target_dir)  # [V, H]
        ids_t = torch.tensor(ids, dtype=torch.long)  # [Vd]: draft row -> target id
        if int(ids_t.max()) >= head.shape[0] or int(ids_t.min()) < 0:
            raise NBDiffError(f"{drafter_dir}: its draft vocabulary names ids outside the target's {head.shape[0]} rows",
                              "pass the model folder the drafter was trained for")
        tensors["lm_head.weight"] = head[ids_t].to(torch.float32).contiguous()  # [Vd, H]
        tensors["d2t"] = (ids_t - torch.arange(len(ids))).contiguous()  # offsets, as the converter expects them
        config["architectures"] = ["DSparkDraftModel"]  # no Markov head: still a plain `dflash` GGUF
        config["draft_vocab_size"] = len(ids)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out
