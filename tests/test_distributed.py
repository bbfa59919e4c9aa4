"""Multi-process training: 2 CPU processes (gloo, launched by torchrun) = 1 process with the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from adapt_helpers import converted_tiny, text_file
from nbdiff.adapt.recipe import AdaptConfig
from nbdiff.adapt.trainer import adapt

ARGS = ["--steps", "3", "--seq-len", "32", "--block-size", "4", "--curriculum", "1,2,4", "--growth-steps", "2",
        "--lr", "3e-3", "--eval-fraction", "0", "--device", "cpu", "--dtype", "fp32"]  # exact comparisons: no autocast


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _max_diff(a, b) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def _single(model, data, out, **kw):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    base = dict(model=str(model), data=[str(data)], out=str(out), steps=3, seq_len=32, block_size=4,
                curriculum="1,2,4", growth_steps=2, lr=3e-3, eval_fraction=0, device="cpu", dtype="fp32")
    base.update(kw)
    return adapt(AdaptConfig(**base))


def test_grad_accum_equals_larger_batch(tmp_path):
    model = converted_tiny(tmp_path / "m")
    data = text_file(tmp_path / "a.txt", repeats=20)
    _single(model, data, tmp_path / "big", batch_size=2)
    _single(model, data, tmp_path / "accum", batch_size=1, grad_accum=2)
    assert _max_diff(tmp_path / "big", tmp_path / "accum") < 1e-4  # fp32 summation order only
    assert _max_diff(tmp_path / "big", model) > 1e-3  # training did move the weights


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    model = converted_tiny(tmp_path / "m")
    data = text_file(tmp_path / "a.txt", repeats=20)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "nbdiff_cli.app", "adapt", str(model), "--data", str(data),
           "--out", str(tmp_path / "ddp"), "--batch-size", "1", *ARGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x2" in proc.stdout  # the run saw two processes
    _single(model, data, tmp_path / "one", batch_size=2)
    assert _max_diff(tmp_path / "ddp", tmp_path / "one") < 1e-4
    assert _max_diff(tmp_path / "ddp", model) > 1e-3
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert sum('"event": "train"' in line for line in lines) == 3  # only rank 0 writes metrics
