"""Option types shared by every command, so a flag means the same thing everywhere.

Use them as `block_size: BlockSize = None`; `None` means "the model folder's setting" or the
library default. Validation lives in the library's settings dataclasses, not here.
"""

from __future__ import annotations

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
    typer.Argument(help="Model folder written by `nbdiff convert` or `nbdiff adapt` (a plain Hugging Face folder decodes at block size 1)."),
]
BlockSize = Annotated[
    Optional[int],
    typer.Option("--block-size", "-b", help="Block size (power of two; 1 = plain AR). Default: the model's.",
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
SystemPrompt = Annotated[Optional[str], typer.Option("--system", help="System prompt (chat template).", rich_help_panel=DECODING)]
Device = Annotated[DeviceChoice, typer.Option("--device", help="Where to run.", rich_help_panel=HARDWARE)]
Dtype = Annotated[DtypeChoice, typer.Option("--dtype", help="Weight dtype (auto: bf16 on GPU, fp32 on CPU).", rich_help_panel=HARDWARE)]
Quantize = Annotated[QuantizeChoice, typer.Option("--quantize", "-q", help="Load weights quantized with bitsandbytes.",
                                                  rich_help_panel=HARDWARE)]
OutDir = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing, non-empty output folder.")]


def make_options(**values):
    """DecodeOptions from the decoding flags of any command (validated there, with the flag names)."""
    from nbdiff.decoding import DecodeOptions

    values["confidence"] = getattr(values["confidence"], "value", values["confidence"])
    return DecodeOptions(**values)
