"""nbdiff.threads: work on a passing thread, whose OpenMP team ends with it (see the module's doc)."""
import os
import signal
import sys
import threading
import time

import pytest
import torch

from nbdiff.threads import in_passing_thread


def test_returns_the_value_from_another_thread():
    seen = []

    def work(a, b=0):
        seen.append(threading.current_thread())
        return a + b

    assert in_passing_thread(work, 2, b=3) == 5
    assert seen and seen[0] is not threading.current_thread() and not seen[0].is_alive()


def test_raises_the_threads_exception_here():
    class Boom(RuntimeError):
        pass

    def work():
        raise Boom("no model here")

    with pytest.raises(Boom, match="no model here"):
        in_passing_thread(work)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts the process's threads in /proc")
def test_the_threads_parallel_team_ends_with_it():
    """A parallel torch operation on the passing thread starts an OpenMP team; none of its threads is left."""
    if torch.get_num_threads() < 2:
        pytest.skip("torch runs one thread here: no team is started")
    tasks = lambda: len(os.listdir("/proc/self/task"))  # noqa: E731
    x = torch.randn(1 << 20)
    expected = x + x  # (on this thread: any team of its own is there before counting)
    before = tasks()
    started = []

    def work():
        out = x.add(x)  # a million elements: above at::parallel_for's grain, so a team works on it
        started.append(tasks())
        return out

    result = in_passing_thread(work)
    assert started[0] > before  # the passing thread and its team were there while it worked
    for _ in range(200):  # libgomp ends the team's threads as the passing thread exits
        if tasks() == before:
            break
        threading.Event().wait(0.01)
    assert tasks() == before
    assert torch.equal(result, expected)


def test_decoding_commands_load_off_the_main_thread(monkeypatch, tmp_path):
    """load_for_decoding (generate, chat, serve, distill, bench, eval) loads on a passing thread."""
    import nbdiff.api
    from nbdiff_cli.models import load_for_decoding

    where = []

    def fake_load(folder, **kwargs):
        where.append(threading.current_thread())
        return "model", "tokenizer"

    monkeypatch.setattr(nbdiff.api, "load", fake_load)
    assert load_for_decoding(str(tmp_path), "cpu", "fp32", "none") == ("model", "tokenizer")
    assert where and where[0] is not threading.main_thread()


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
def test_a_signal_reaches_the_waiting_caller_at_once():
    """Ctrl-C while a model loads on the passing thread stops the command then, not when loading ends."""

    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted

    previous = signal.signal(signal.SIGUSR1, handler)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        start = time.monotonic()
        timer.start()
        with pytest.raises(Interrupted):
            in_passing_thread(time.sleep, 5)
        assert time.monotonic() - start < 3
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)
