"""Atomic writes and quiet libraries: the one way nbdiff writes files and silences transformers.

Notable features:
- Everything is written into a hidden sibling named `.<name>.nbdiff-tmp-<pid>-<random>` and renamed
  into place only when complete, so a reader (or a crash) never sees half a file or folder. On an
  error the temporary is removed and the error propagates unchanged.
- A process killed with SIGKILL cannot clean up; `clean_stale_temps` removes the temporaries of
  processes that are gone (the pid in the name says whose they are). Nothing without the marker is
  ever touched: nbdiff deletes only what nbdiff wrote.
- `quiet_transformers` silences transformers' logging and progress bars (and the GGUF loader's own
  tqdm) for the duration of a block, and `quiet_bitsandbytes` its per-forward warnings: the
  library never prints.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator

# .<final name>.nbdiff-<tmp|old>-<pid>-<random>[<suffix>]  (the suffix keeps a file's extension)
_TEMP = re.compile(r"^\.(?P<name>.+)\.nbdiff-(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}(?:\.[^.]*)?$")


def temp_sibling(final: Path, kind: str = "tmp") -> Path:
    """A fresh hidden sibling of `final` that marks itself as nbdiff's and names this process."""
    final = Path(final)
    return final.parent / f".{final.name}.nbdiff-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}{final.suffix}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else (or we cannot tell): keep its files
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale_temps(final: Path) -> list[Path]:
    """Remove the nbdiff temporaries of `final` left by processes that no longer run; returns them."""
    final = Path(final)
    removed: list[Path] = []
    if not final.parent.is_dir():
        return removed
    prefix = f".{final.name}.nbdiff-"
    with contextlib.suppress(OSError):
        for entry in final.parent.iterdir():
            if not entry.name.startswith(prefix):
                continue
            match = _TEMP.match(entry.name)
            if match is None or match["name"] != final.name or _pid_alive(int(match["pid"])):
                continue
            _remove(entry)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_dir(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling folder; on success it becomes `final`, on error it is removed.

    An existing empty `final` is replaced; a non-empty one only with `replace=True`, and then only
    after the new folder is complete (the old one is moved aside, the new one renamed in, the old
    one deleted). Parent folders this call created are removed again on error.
    """
    final = Path(final)
    clean_stale_temps(final)
    created = [p for p in reversed(final.parents) if not p.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final)
    try:
        tmp.mkdir()
        yield tmp
        _move_dir_into_place(tmp, final, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(created):
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


def _move_dir_into_place(tmp: Path, final: Path, replace: bool) -> None:
    old = None
    if final.exists() or final.is_symlink():
        if final.is_dir() and not final.is_symlink() and not any(final.iterdir()):
            final.rmdir()
        elif not replace:
            raise FileExistsError(17, "already exists", str(final))
        else:
            old = temp_sibling(final, "old")
            os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)
        raise
    if old is not None:
        _remove(old)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path (same extension) to write; it replaces `path` on success."""
    path = Path(path)
    clean_stale_temps(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings and progress bars (and the GGUF loader's tqdm) in this block."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # The GGUF loader calls tqdm directly, ignoring the switch above; give it a silent one.
    gguf_utils = _gguf_utils_module()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm


def quiet_bitsandbytes() -> None:
    """Keep bitsandbytes' warnings off the screen for the rest of the process.

    They are not per call: int8 layers warn on every forward that their input is cast to fp16
    (hundreds of identical lines per reply), and on CPU the import warns that the optional
    `kernels` package is missing. Both are expected and harmless here. Errors still show.
    On CPUs with AVX512-BF16 its import fetches a kernel through the `kernels` package, which says
    it skips a publisher check in offline mode: nothing a user can act on, so that logger is quieted too.
    """
    import logging

    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _gguf_utils_module():
    try:
        from transformers import modeling_gguf_pytorch_utils
    except Exception:  # gguf support missing: nothing to silence
        return None
    return modeling_gguf_pytorch_utils
