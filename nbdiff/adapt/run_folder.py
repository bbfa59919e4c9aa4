"""The output folder of `nbdiff adapt`: what may be replaced, who may write, and how a run replaces another.

Notable features:
- nbdiff deletes only what nbdiff wrote. `--out` may not be, contain or lie inside the model folder
  or a data path. A non-empty `--out` is replaced (`--force`) only when it looks like an adapt run:
  a recipe.yaml, metrics.jsonl or checkpoints/ in it, and nothing but the files a run writes.
- `--force` never deletes up front: the new run writes into a hidden sibling
  (`.OUT.nbdiff-tmp-<pid>-<id>`, see nbdiff.fsutil) that takes the old folder's place only when it
  holds its first checkpoint or its final model (`RunFolder.commit`). A run that fails or is
  stopped before that leaves the old run as it was.
- One run per folder: `.OUT.nbdiff-lock` next to the folder is locked (flock) while the run lives.
  The kernel drops the lock when the process ends, however it ends, so a lock left by a killed run
  is stale by construction; the pid written inside names the holder in the refusal.
- A run that fails while setting up (bad model folder, bad data) removes what it created.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
from pathlib import Path

from nbdiff.errors import NBDiffError

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
RECIPE = "recipe.yaml"
DATA_CACHE = "data-cache"
FEATURE_CACHE = "feature-cache"  # a drafter run's AR features (nbdiff.drafter.train.FeatureCache)

# Names an adapt run writes into its folder (run files, the final model or adapter, `nbdiff plot`'s default PNG).
RUN_FILES = (RECIPE, METRICS, "loss.png", "config.json", "generation_config.json", "model.safetensors",
             "model-*-of-*.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
             "tokenizer.model", "chat_template.jinja", "chat_template.json", "adapter_config.json",
             "adapter_model.safetensors", "README.md", "nbdiff.json", ".*.nbdiff-tmp-*")
RUN_DIRS = (CHECKPOINTS, DATA_CACHE, FEATURE_CACHE, ".*.nbdiff-tmp-*")
RUN_MARKERS = (RECIPE, METRICS, CHECKPOINTS)


def check_overlap(out: Path, model: Path, data: list[Path]) -> None:
    """Refuse an --out that is, contains or lies inside the model folder or a data path."""
    o = out.resolve()
    for what, path in [("the model folder", model), *(("the data path", d) for d in data)]:
        p = Path(path).resolve()
        if o == p or o in p.parents or p in o.parents:
            raise NBDiffError(f"--out {out} overlaps {what} {path}",
                              "choose an --out outside the model folder and the data")


def foreign_entry(out: Path) -> str | None:
    """The first entry of `out` that shows it is not an adapt run folder (None: it is one)."""
    entries = sorted(out.iterdir(), key=lambda p: p.name)
    if not any(e.name in RUN_MARKERS for e in entries):
        return entries[0].name if entries else None
    for e in entries:
        patterns = RUN_DIRS if e.is_dir() and not e.is_symlink() else RUN_FILES
        if not any(fnmatch.fnmatchcase(e.name, pat) for pat in patterns):
            return e.name
    return None


class RunLock:
    """An exclusive lock on one --out, as a file next to it (see the module docstring)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        real = self.out.resolve()  # `--out .` has no name of its own
        self.path = real.parent / f".{real.name}.nbdiff-lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            holder = _lock_fd(fd)
            if holder is not None:
                os.close(fd)
                raise NBDiffError(f"another adapt run (pid {holder}) is writing to {self.out}",
                                  "wait for it to end (Ctrl-C there keeps a checkpoint), or choose another --out")
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file between our open and our lock: retry
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lock_fd(fd: int) -> str | None:
    """Lock `fd`; None on success, else the pid written by the holder."""
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        pass
    except (ImportError, OSError):  # no flock here (another OS, some network filesystems): trust the pid
        pid = _read_pid(fd)
        if pid is None or not pid.isdigit() or int(pid) == os.getpid() or not _alive(int(pid)):
            return None
    return _read_pid(fd) or "unknown"


def _read_pid(fd: int) -> str | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").strip()
    return text or None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class RunFolder:
    """Where one run writes: `out` itself, or while it replaces an old run, a hidden sibling (`staging`).

    `dir` is where files go now; every process of a run holds the same paths. Only the main
    process creates, moves or deletes anything.
    """

    def __init__(self, out: Path, is_main: bool):
        self.out = Path(out)
        self.is_main = is_main
        self.staging: Path | None = None
        self.lock = RunLock(self.out)
        self._created_out = False
        self._was_empty = False

    @property
    def dir(self) -> Path:
        return self.staging if self.staging is not None else self.out

    def open(self, resume: bool, force: bool, model: Path, data: list[Path], broadcast) -> None:
        """Check and lock `out`; with `force` on an old run, set up the staging folder.

        `broadcast(obj)` hands the main process's value to every process (identity for one process).
        """
        check_overlap(self.out, model, data)
        if self.out.exists() and not self.out.is_dir():
            raise NBDiffError(f"--out {self.out} exists and is not a folder", "choose another --out")
        if self.is_main:
            self.lock.acquire()
        has_run = self.out.is_dir() and any(self.out.iterdir())
        self._created_out, self._was_empty = not self.out.exists(), not has_run
        staging = None
        if has_run and not resume:
            if not force:
                hint = "pass --resume to continue it" if (self.out / CHECKPOINTS).is_dir() else "pass --force to replace it"
                raise NBDiffError(f"output folder {self.out} is not empty", hint + ", or choose another --out")
            foreign = foreign_entry(self.out)
            if foreign is not None:
                raise NBDiffError(f"--force: {self.out} does not look like an adapt run (it holds {foreign!r})",
                                  "nbdiff replaces only folders it wrote; choose another --out or empty it yourself")
            if self.is_main:
                from nbdiff.fsutil import clean_stale_temps, temp_sibling

                clean_stale_temps(self.out.resolve())  # staging folders of killed runs
                staging = temp_sibling(self.out.resolve())
                staging.mkdir()
        self.staging = broadcast(staging)
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)

    def commit(self) -> None:
        """The new run has a checkpoint or a model: let it take the old run's place (no-op otherwise)."""
        if self.staging is None:
            return
        if self.is_main:
            from nbdiff.fsutil import temp_sibling

            real = self.out.resolve()
            old = temp_sibling(real, "old")
            os.rename(real, old)
            try:
                os.rename(self.staging, real)
            except BaseException:
                os.rename(old, real)
                raise
            shutil.rmtree(old, ignore_errors=True)
        self.staging = None

    def abandon(self, setup_failed: bool) -> None:
        """A run ends without committing: drop its staging folder; after a failed setup, what it created."""
        if not self.is_main:
            return
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        elif setup_failed and self._was_empty and self.out.is_dir():
            for name in (RECIPE, METRICS, DATA_CACHE, CHECKPOINTS):
                path = self.out / name
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                elif path.exists():
                    path.unlink()
            if self._created_out:
                with contextlib.suppress(OSError):
                    self.out.rmdir()

    def close(self) -> None:
        self.abandon(setup_failed=False)
        if self.is_main:
            self.lock.release()
