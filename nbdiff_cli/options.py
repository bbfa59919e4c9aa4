"""Option types shared by every command, so a flag means the same thing everywhere.

Use them as `block_size: BlockSize = None`; `None` means "the model folder's setting" or the
library default. Validation lives in the library's settings dataclasses, not here.

The decoding commands (generate, chat, visualize) declare their shared flags once, with the
`decoding_options` decorator: the command receives `options: DecodeOptions`, `hardware: Hardware`
and `system` instead of fifteen parameters. Defaults come from `DecodeOptions`.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

DECODING = "Decoding"
HARDWARE = "Hardware"


class Confidence(str, Enum):
    prob = "prob"
    entropy = "entropy"
    margin = "margin"


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class DtypeChoice(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class QuantizeChoice(str, Enum):
    none = "none"
    nf4 = "nf4"
    fp4 = "fp4"
    int8 = "int8"


ModelArg = Annotated[
    Optional[str],
    typer.Argument(help="Model folder written by `nbdiff convert` or `nbdiff adapt` (also an --export adapter folder; a plain Hugging Face folder decodes at block size 1). Omitted: the default model (SmolLM2-135M adapted by nbdiff, built on first use)."),
]
BlockSize = Annotated[
    Optional[int],
    typer.Option("--block-size", "-b", help="Block size (power of two; 1 = plain AR). Default: the block size the model was adapted to (1 right after `nbdiff convert`; `nbdiff info` shows it); a larger one decodes with a warning.",
                 rich_help_panel=DECODING),
]
SubBlocks = Annotated[
    int, typer.Option("--sub-blocks", help="Split each block into this many sub-blocks decoded left to right.",
                      rich_help_panel=DECODING)
]
Threshold = Annotated[
    float, typer.Option("--threshold", help="Also commit every masked token whose confidence exceeds this (0, 1].",
                        rich_help_panel=DECODING)
]
ConfidenceOpt = Annotated[
    Confidence, typer.Option("--confidence", help="Confidence rule: token probability, negative entropy, or top1-top2 margin.",
                             rich_help_panel=DECODING)
]
Temperature = Annotated[
    float, typer.Option("--temperature", "-t", help="Sampling temperature; 0 = greedy.", rich_help_panel=DECODING)
]
TopK = Annotated[int, typer.Option("--top-k", help="Sample among the k most likely tokens (0 = off).", rich_help_panel=DECODING)]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (1.0 = off).", rich_help_panel=DECODING)]
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Stop after this many new tokens.", rich_help_panel=DECODING)]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Seed for sampling.", rich_help_panel=DECODING)]
Exact = Annotated[bool, typer.Option("--exact", help="Verify every drafted block with the model's causal pass: output identical to AR.",
                                     rich_help_panel=DECODING)]
DraftSteps = Annotated[Optional[int], typer.Option("--draft-steps", help="Exact mode: diffusion drafts of at most this many denoising forwards (1 = one-shot).",
                                                   rich_help_panel=DECODING)]
DrafterOpt = Annotated[str, typer.Option("--drafter", help="Exact mode: auto (prompt lookup, then the model folder's trained drafter if it has one; else n-gram lookup, in blocks of 2 unless --block-size; diffusion when --draft-steps is given), diffusion (denoising steps, until the block is filled unless --draft-steps), ngram (lookup in the prompt and reply), or a trained drafter's folder (DIR; turns --exact on; lookup+DIR: prompt lookup when it matches, the drafter otherwise).",
                                         rich_help_panel=DECODING)]
DraftThreshold = Annotated[float, typer.Option("--draft-threshold", help="Trained drafter: verify drafted tokens while the product of their draft probabilities exceeds this (0 = the whole block).",
                                               rich_help_panel=DECODING)]
DraftGate = Annotated[Optional[float], typer.Option("--draft-gate", help="Trained drafter: run it for a block only where the model's confidence in the block's first token is at least this (0 = every block; default 0.6, the plan's DRAFT_GATE).",
                                                    rich_help_panel=DECODING)]
SystemPrompt = Annotated[Optional[str], typer.Option("--system", help="System prompt (chat template).", rich_help_panel=DECODING)]
Device = Annotated[DeviceChoice, typer.Option("--device", help="Where to run.", rich_help_panel=HARDWARE)]
Dtype = Annotated[DtypeChoice, typer.Option("--dtype", help="Weight dtype (auto: bf16 on GPU and on CPUs with native bf16, else fp32; `nbdiff info` shows the choice).", rich_help_panel=HARDWARE)]
Quantize = Annotated[QuantizeChoice, typer.Option("--quantize", "-q", help="Load weights quantized with bitsandbytes.",
                                                  rich_help_panel=HARDWARE)]
OutDir = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing, non-empty output folder.")]


def make_options(**values):
    """DecodeOptions from the decoding flags of any command (validated there, with the flag names)."""
    from nbdiff.decode.options import DecodeOptions

    values = {k: getattr(v, "value", v) for k, v in values.items()}  # enum choices -> their strings
    return DecodeOptions(**values)


@dataclass
class Hardware:
    """Where and how to load the model (--device, --dtype, --quantize), as the command's choices."""

    device: DeviceChoice = DeviceChoice.auto
    dtype: DtypeChoice = DtypeChoice.auto
    quantize: QuantizeChoice = QuantizeChoice.none


# flag parameter -> its type; defaults come from DecodeOptions (one home for each default)
DECODING_FLAGS = {
    "block_size": BlockSize, "sub_blocks": SubBlocks, "threshold": Threshold, "confidence": ConfidenceOpt,
    "temperature": Temperature, "top_k": TopK, "top_p": TopP, "max_new_tokens": MaxNewTokens, "seed": Seed,
    "exact": Exact, "draft_steps": DraftSteps, "drafter": DrafterOpt, "draft_threshold": DraftThreshold,
    "draft_gate": DraftGate,
}
HARDWARE_FLAGS = {"device": Device, "dtype": Dtype, "quantize": Quantize}
_CHOICES = {"confidence": Confidence}


def decoding_options(max_new_tokens: int | None = None, hardware: bool = True, system: bool = True):
    """Give a command the shared decoding flags, declared here once.

    The decorated function takes `options` (a validated DecodeOptions) and, unless turned off,
    `hardware` (a Hardware) and `system` (--system); its own parameters stay as they are.
    `max_new_tokens` overrides that flag's default (visualize shows shorter runs).
    """
    from nbdiff.decode.options import DecodeOptions

    defaults = DecodeOptions().to_dict()
    if max_new_tokens is not None:
        defaults["max_new_tokens"] = max_new_tokens
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                          default=_CHOICES[name](defaults[name]) if name in _CHOICES else defaults[name])
        for name, kind in DECODING_FLAGS.items()
    ]
    if system:
        added.append(inspect.Parameter("system", inspect.Parameter.KEYWORD_ONLY, annotation=SystemPrompt, default=None))
    if hardware:
        added += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=getattr(Hardware, name))
                  for name, kind in HARDWARE_FLAGS.items()]

    def wrap(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name not in ("options", "hardware", "system")]

        @functools.wraps(fn)
        def command(**kwargs):
            kwargs["options"] = make_options(**{name: kwargs.pop(name) for name in DECODING_FLAGS})
            if hardware:
                kwargs["hardware"] = Hardware(**{name: kwargs.pop(name) for name in HARDWARE_FLAGS})
            return fn(**kwargs)

        params = own + added
        command.__signature__ = sig.replace(parameters=params)  # what Typer reads
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return wrap
