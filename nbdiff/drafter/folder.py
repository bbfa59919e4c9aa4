"""A drafter on disk: `model.safetensors` (draft layers and fusion only) and `config.json`.

config.json is a Qwen3-style config as DFlash's published drafters carry it (`architectures:
["DFlashDraftModel"]`, the layer shape, `block_size`, `num_target_layers`, `dflash_config:
{target_layer_ids, mask_token_id}`) plus an `nbdiff_drafter` section, the `DrafterConfig`, which
names the AR model: its shape, a fingerprint of its weights and a probe of 16 embedding rows. A model
folder that holds a `drafter/` subfolder brings its drafter along, and nbdiff ships drafters under
`assets/drafters/<name>/`, found for a model by its weights (`shipped_drafter`): the exact fingerprint
for fp32/bf16/fp16 copies, the probe's cosine similarity for quantized ones (`match_target`, which
`load_drafter` applies too); which one runs is decided by the drafting plan (nbdiff.decode.plan).
A DFlash checkpoint (its config.json without our section) loads too, for the AR model it drafts
for (`from_dflash`): plain DFlashDraftModel drafters (full attention, unscaled RoPE); its AR model
is not named there, so only the width and the layer count are checked.

Tensor names are DFlash's (`dflash/model.py`, `DFlashDraftModel.state_dict()`), one to one:

    fc.weight                                   [H, n*H]   fusion of the n AR layers read
    hidden_norm.weight                          [H]        RMSNorm after the fusion
    layers.{i}.input_layernorm.weight           [H]
    layers.{i}.self_attn.{q,k,v,o}_proj.weight             no biases
    layers.{i}.self_attn.{q,k}_norm.weight      [d]        per-head RMSNorm (config qk_norm)
    layers.{i}.post_attention_layernorm.weight  [H]
    layers.{i}.mlp.{gate,up,down}_proj.weight              SiLU-gated MLP
    norm.weight                                 [H]        before the (AR's) LM head

Same conventions too: features are hidden_states[i + 1] for i in target_layer_ids, each draft
layer's k_proj/v_proj (and k_norm) read the fused features unnormalised by input_layernorm, RoPE
(rope_theta, no scaling) at the tokens' own positions, offset j predicts the token at j, no mask
inside the block. Not in DFlash's layout: a reduced draft vocabulary (`nbdiff_drafter.draft_vocab`;
DFlash runtimes assume the whole vocabulary) and `qk_norm: false`. A drafter with neither loads into
DFlash's reference class as it is: a throwaway check (not a test: it needs DFlash's code) built
`DFlashDraftModel` from this config.json (`Qwen3Config(**config)`), loaded model.safetensors with
strict=True and got our logits on a tiny Llama target, to the last bit. Loading through
transformers' AutoModel needs DFlash's `auto_map` and remote code, which nbdiff never writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nbdiff.drafter.config import PROBE_MATCH, DrafterConfig, fingerprint, probe_similarity, target_hidden_layers
from nbdiff.drafter.model import Drafter
from nbdiff.errors import NBDiffError
from nbdiff.fsutil import atomic_dir

SECTION = "nbdiff_drafter"
WEIGHTS = "model.safetensors"
SUBFOLDER = "drafter"
"""Name of the drafter folder inside a model folder (found automatically)."""
TRAIN_HINT = "train one for this model: `nbdiff adapt MODEL --target drafter --data FILE --out DIR`"


def dflash_config(c: DrafterConfig) -> dict:
    """The Qwen3-style config DFlash runtimes read, with our settings in the `nbdiff_drafter` section."""
    return {
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "intermediate_size": c.intermediate_size,
        "hidden_act": "silu", "attention_bias": False, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
        "vocab_size": c.vocab_size, "tie_word_embeddings": False, "block_size": c.block_size,
        "num_target_layers": c.num_target_layers,
        "dflash_config": {"target_layer_ids": list(c.target_layer_ids), "mask_token_id": c.mask_token_id},
        SECTION: c.to_dict(),
    }


def save_drafter(drafter: Drafter, out_dir, *, replace: bool = True) -> Path:
    """Write the drafter's own weights and config to out_dir. Returns the folder.

    A new (or empty) folder is written whole and renamed into place. An existing drafter folder
    (`replace=True`) has only its weights and config replaced, each atomically, weights first and
    config last; its other files (a README, a licence) stay. Any other non-empty folder is refused:
    nothing here deletes what nbdiff did not write."""
    from safetensors.torch import save_file

    from nbdiff.fsutil import atomic_file, atomic_write_text

    out = Path(out_dir)
    tensors = {k: v.detach().contiguous().cpu() for k, v in drafter.state_dict().items()}
    config = json.dumps(dflash_config(drafter.config), indent=2) + "\n"
    if out.is_dir() and any(out.iterdir()):
        if not is_drafter_folder(out):
            raise NBDiffError(f"{out} holds files and is not a drafter folder: not writing a drafter into it",
                              "name a new or empty folder")
        if not replace:
            raise NBDiffError(f"{out} already holds a drafter", "name another folder, or replace it")
        with atomic_file(out / WEIGHTS) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        atomic_write_text(out / "config.json", config)
        return out
    with atomic_dir(out, replace=replace) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(config, encoding="utf-8")
    return out


def is_drafter_folder(path) -> bool:
    """config.json with an `nbdiff_drafter` (or DFlash's `dflash_config`) section, and model.safetensors."""
    folder = Path(path)
    if not (folder / "config.json").is_file() or not (folder / WEIGHTS).is_file():
        return False
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and (SECTION in data or "dflash_config" in data)


def find_drafter(folder) -> Path | None:
    """The drafter a model folder brings along (its `drafter/` subfolder), if any."""
    if folder is None:
        return None
    folder = Path(folder) / SUBFOLDER
    return folder if is_drafter_folder(folder) else None


def model_folder(model) -> Path | None:
    """The folder a transformers model was loaded from, if it is a local folder."""
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
    return Path(name) if name and Path(name).is_dir() else None


def bundled_drafter(model) -> Path | None:
    """The drafter the model's folder brings along (its drafter/ subfolder), if any: exact mode's 'auto' uses it."""
    return find_drafter(model_folder(model))


REGISTRY_ENV = "NBDIFF_DRAFTERS_DIR"
"""Environment variable naming another folder of shipped drafters (tests, a site's own collection)."""


def shipped_drafters_dir() -> Path:
    """The registry of drafters nbdiff ships: `assets/drafters/<name>/`, each a drafter folder ($NBDIFF_DRAFTERS_DIR overrides)."""
    import os

    from nbdiff.resources import asset_path

    where = os.environ.get(REGISTRY_ENV)
    return Path(where).expanduser() if where else asset_path("drafters", must_exist=False)


def shipped_drafter(model, registry=None) -> Path | None:
    """The shipped drafter trained for this model, found by the model's weights, not its name or folder.

    A drafter folder's config records two things about the AR model it was trained on:
    `fingerprint(model)` (a hash of the signs of a fixed sample of the embedding and LM head: the same
    in fp32, bf16 and fp16 copies, and with a mask token's row added by `nbdiff convert`) and
    `weight_probe(model)` (16 of its embedding rows in bf16, about 10 KB for a 896-wide model). A
    drafter of the registry is this model's when `check_pair` accepts it (`match_target`: architecture,
    width, layer count, vocabulary within one row, then the same fingerprint, or else the probe's rows
    at a mean cosine >= PROBE_MATCH against this model's, which a quantized copy passes: a drafter
    trained on a Q4_K_M GGUF's weights serves the bf16 original and a Q8_0 copy). An exact fingerprint
    match is returned at once; else the first probe match in name order; None when the registry has
    neither. Folders written before the probe existed match by fingerprint only.
    """
    root = Path(registry).expanduser() if registry is not None else shipped_drafters_dir()
    if not root.is_dir():
        return None
    close = None
    for folder in sorted(p for p in root.iterdir() if (p / WEIGHTS).is_file() and (p / "config.json").is_file()):
        try:
            config = _registry_config(folder)
            if config is None:
                continue  # a DFlash checkpoint names no AR model: never picked for one
            how = check_pair(config, model, where=f"drafter {folder}")
        except (OSError, ValueError, NBDiffError):
            continue  # another model's drafter, or one this nbdiff cannot read: not this model's
        if how == "fingerprint":
            return folder
        close = close or folder
    return close


_REGISTRY_CONFIGS: dict[Path, tuple[tuple[int, int], DrafterConfig | None]] = {}


def _registry_config(folder: Path) -> DrafterConfig | None:
    """A registry folder's DrafterConfig (None: it names no AR model), read again only when its config.json
    changes: every exact-mode call with --drafter auto looks through the registry, and a shipped config
    (12k draft ids) costs about 2 ms to parse."""
    path = folder / "config.json"
    stat = path.stat()
    key = (stat.st_mtime_ns, stat.st_size)
    kept = _REGISTRY_CONFIGS.get(path)
    if kept is not None and kept[0] == key:
        return kept[1]
    data = json.loads(path.read_text(encoding="utf-8"))
    section = (data.get(SECTION) if isinstance(data, dict) else None) or {}
    config = DrafterConfig.from_dict(section) if section.get("target_fingerprint") or section.get("target_probe") else None
    _REGISTRY_CONFIGS[path] = (key, config)
    return config


def _read_config_json(path) -> dict:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise NBDiffError(f"drafter folder {path} does not exist", TRAIN_HINT)
    if not is_drafter_folder(folder):
        raise NBDiffError(f"{path} is not a drafter folder (config.json with an `{SECTION}` section and {WEIGHTS})",
                          TRAIN_HINT)
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def read_drafter_config(path, ar_model=None) -> DrafterConfig:
    """The folder's DrafterConfig; a DFlash checkpoint (no `nbdiff_drafter` section) is read for `ar_model`."""
    data = _read_config_json(path)
    if SECTION in data:
        return DrafterConfig.from_dict(data[SECTION])
    if ar_model is None:
        raise NBDiffError(f"{path} is a DFlash checkpoint: it is read together with its AR model", "load it with load_drafter")
    return from_dflash(data, ar_model, str(path))


def from_dflash(data: dict, ar_model, where: str = "the checkpoint") -> DrafterConfig:
    """A DrafterConfig for a DFlash checkpoint's config.json (Qwen3-style, `dflash_config`) and the AR model
    it drafts for. Its AR model is not named there: only the width and layer count are checked."""
    arch = (data.get("architectures") or ["?"])[0]
    rope = data.get("rope_scaling") or (data.get("rope_parameters") or {}).get("rope_type", "default") != "default"
    dflash = data.get("dflash_config") or {}
    if (arch != "DFlashDraftModel" or set(data.get("layer_types") or ["full_attention"]) != {"full_attention"}
            or data.get("attention_bias") or rope or "mask_token_id" not in dflash):
        raise NBDiffError(f"{where} is a {arch} checkpoint nbdiff cannot run (sliding windows, biases, scaled RoPE "
                          "or no mask token id)", "nbdiff runs DFlashDraftModel drafters with full attention and plain RoPE")
    layers, n = int(data["num_target_layers"]), int(data["num_hidden_layers"])
    heads = int(data["num_attention_heads"])
    theta = data.get("rope_theta") or (data.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return DrafterConfig(
        target_architecture=(getattr(ar_model.config, "architectures", None) or [type(ar_model).__name__])[0],
        hidden_size=int(data["hidden_size"]), num_attention_heads=heads,
        num_key_value_heads=int(data.get("num_key_value_heads") or heads),
        head_dim=int(data.get("head_dim") or int(data["hidden_size"]) // heads),
        intermediate_size=int(data["intermediate_size"]), num_target_layers=layers,
        target_layer_ids=list(dflash.get("target_layer_ids") or target_hidden_layers(layers, n)),
        mask_token_id=int(dflash["mask_token_id"]), vocab_size=int(data["vocab_size"]), num_hidden_layers=n,
        block_size=int(data.get("block_size", 16)), rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta), target_name=f"DFlash checkpoint {where}",
    )


def match_target(config: DrafterConfig, ar_model) -> tuple[str, list[str]]:
    """Whether ar_model is the model the drafter was trained for: (how, []) if it is, ("", reasons) if not.

    The architecture, the width and the layer count must be the drafter's, the vocabulary its size or
    one row more or less (`nbdiff convert` may add a mask token's row). Then the weights: `how` is
    "fingerprint" when the exact hash of their signs is the recorded one (fp32, bf16, fp16 copies),
    "probe" when the recorded embedding rows agree with this model's at a mean cosine similarity of at
    least PROBE_MATCH (a quantized copy: a Q4 GGUF dequantized, a Q8_0 one, the bf16 original of a
    quantized file), and "shape" for a DFlash checkpoint, which names no model (its shape is all there
    is to check). The one rule behind `check_pair` and `shipped_drafter`.
    """
    c = ar_model.config
    arch = (getattr(c, "architectures", None) or [type(ar_model).__name__])[0]
    found = []
    if arch != config.target_architecture:
        found.append(f"architecture {arch} (drafter: {config.target_architecture})")
    if int(c.hidden_size) != config.hidden_size:
        found.append(f"hidden size {c.hidden_size} (drafter: {config.hidden_size})")
    if int(c.num_hidden_layers) != config.num_target_layers:
        found.append(f"{c.num_hidden_layers} layers (drafter: {config.num_target_layers})")
    names_model = bool(config.target_fingerprint or config.target_probe)
    vocab = ar_model.get_output_embeddings().weight.shape[0]
    if names_model and abs(vocab - config.vocab_size) > 1:
        found.append(f"vocabulary of {vocab} (drafter: {config.vocab_size})")
    if found:
        return "", found
    if not names_model:
        return "shape", []
    if config.target_fingerprint and fingerprint(ar_model) == config.target_fingerprint:
        return "fingerprint", []
    if config.target_probe is None:
        return "", ["different weights (fingerprint)"]  # a folder written before the probe existed
    similarity = probe_similarity(config.target_probe, ar_model)
    if similarity >= PROBE_MATCH:
        return "probe", []
    return "", [f"different weights (fingerprint, and embedding rows at cosine {similarity:.3f}, "
                f"a copy of its model gives >= {PROBE_MATCH})"]


def check_pair(config: DrafterConfig, ar_model, where: str = "the drafter") -> str:
    """Refuse a drafter trained for another AR model (one line, with a hint); else say how it matched
    ("fingerprint", "probe" or "shape", see `match_target`)."""
    how, found = match_target(config, ar_model)
    if found:
        trained = f" (trained for {config.target_name})" if config.target_name else ""
        raise NBDiffError(f"{where} does not belong to this model{trained}: {', '.join(found)}", TRAIN_HINT)
    vocab = ar_model.get_output_embeddings().weight.shape[0]
    if config.mask_token_id >= vocab or (config.draft_vocab and max(config.draft_vocab) >= vocab):
        raise NBDiffError(f"{where} uses token ids beyond this model's vocabulary ({vocab})", TRAIN_HINT)
    return how


def new_drafter(config: DrafterConfig, ar_model) -> Drafter:
    """A drafter (random draft layers) sharing ar_model's embedding and LM head, on its device and dtype."""
    embed, head = ar_model.get_input_embeddings(), ar_model.get_output_embeddings()
    drafter = Drafter(config, embed, head)
    dtype = embed.weight.dtype if embed.weight.is_floating_point() else torch.float32
    return drafter.to(device=embed.weight.device, dtype=dtype)


def load_drafter(path, ar_model) -> Drafter:
    """Load a drafter folder for ar_model (refused with NBDiffError if it was trained for another model)."""
    from safetensors.torch import load_file

    config = read_drafter_config(path, ar_model)
    check_pair(config, ar_model, where=f"drafter {path}")
    drafter = new_drafter(config, ar_model)
    try:
        tensors = load_file(str(Path(path).expanduser() / WEIGHTS))
    except Exception as exc:  # safetensors raises its own error type for truncated files
        raise NBDiffError(f"the weights in {path} are corrupt or truncated ({str(exc).splitlines()[0]})",
                          "write the drafter folder again") from None
    missing, unexpected = drafter.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise NBDiffError(f"drafter {path} does not match its config (missing {len(missing)}, unexpected "
                          f"{len(unexpected)} tensors, e.g. {(missing or unexpected)[0]})", "write the drafter folder again")
    from nbdiff.cpu_kernel import install

    # fp32 on a CPU: its block of drafted rows through the few-row kernel, weights saved in bf16 kept so (fp32 sums)
    install(drafter, bf16_weights=True)
    return drafter.eval()
