"""Tiny model folders for the decoding tests: a plain one and one with nbdiff settings."""

import math
from pathlib import Path

import torch

from nbdiff.decode.sampling import filtered_probs

from nbdiff.testing import save_tiny_checkpoint, save_tiny_converted


def plain_folder(path: Path, arch: str = "llama", **overrides) -> Path:
    save_tiny_checkpoint(path, arch, **overrides)
    return path


def converted_folder(path: Path, arch: str = "llama", block_size: int = 4, adapted: int = 1, **overrides) -> Path:
    """A tiny folder whose config.json carries nbdiff settings (mask = the last vocabulary id)."""
    return save_tiny_converted(path, arch, block_size=block_size, adapted=adapted, mask="last", **overrides)


def assert_top2_ar_distribution(model, prompt: list[int], rows: list[list[int]]) -> dict:
    """Sampled 3-token replies `rows` follow the AR model's top-2 distribution (temperature 1), cell by cell.

    The expected share of every reply is the product of AR's next-token probabilities along it; each
    observed count must lie within 5 standard deviations (+1) of N times that share. Returns the
    expected shares by reply.
    """
    def probs(ctx):
        with torch.no_grad():
            logits = model(torch.tensor([ctx])).logits[0, -1:]
        return filtered_probs(logits, 1.0, top_k=2)[0]

    expected = {}
    p0 = probs(prompt)
    for t0 in p0.nonzero()[:, 0].tolist():
        p1 = probs(prompt + [t0])
        for t1 in p1.nonzero()[:, 0].tolist():
            p2 = probs(prompt + [t0, t1])
            for t2 in p2.nonzero()[:, 0].tolist():
                expected[(t0, t1, t2)] = float(p0[t0] * p1[t1] * p2[t2])
    n = len(rows)
    counts: dict = {}
    for row in rows:
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert set(counts) <= set(expected)
    for cell, p in expected.items():
        sd = math.sqrt(n * p * (1 - p))
        assert abs(counts.get(cell, 0) - n * p) <= 5 * sd + 1, (cell, counts.get(cell, 0), n * p)
    return expected


def linked_copy(folder, dest):
    """`dest` with a symbolic link to every file of `folder`: a folder to add files to, without copying weights."""
    dest.mkdir()
    for item in folder.iterdir():
        (dest / item.name).symlink_to(item)
    return dest
