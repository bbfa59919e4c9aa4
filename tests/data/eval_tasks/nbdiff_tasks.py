"""Loader for the local lm-eval tasks in this folder: rows come from a .jsonl next to the YAML."""

import json
from pathlib import Path


def load(file: str, **_metadata):
    """A DatasetDict with one split, `test`, read from `file` (relative to this folder)."""
    import datasets

    rows = [json.loads(line) for line in (Path(__file__).parent / file).read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
