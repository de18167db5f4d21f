"""A run's output directory: one job at a time (a lock), and a config that never changes silently.

`RunLock` takes an exclusive `flock` on `<run>/run.lock` (holder's pid, host, start time and
command line written into it). A second job on the same directory fails at once with
`RunLockedError` naming the holder; the kernel drops the lock when its process dies, so a
killed job's stale lock is taken over by the next start without any cleanup.

`check_resume_config` compares the config of a resumed run with the one it was started with
(`config.yaml`): keys that change the result stop the run with one line listing them, unless
the resume is forced; every resume is appended to `config_history.jsonl` and `config.yaml`
keeps the configuration the run was started with.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterable
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover (not POSIX)
    fcntl = None

LOCK_NAME = "run.lock"
HISTORY_NAME = "config_history.jsonl"


class RunLockedError(RuntimeError):
    """The run directory is in use by another job."""


class ConfigChangedError(ValueError):
    """A resumed run's config differs from the saved one in keys that change the result."""


class RunLock:
    """Exclusive lock on a run directory, held from `acquire()` to `release()` (a context
    manager too). Only the calling process is locked; in a multi-process job, process 0 takes
    it (see `jaxstack.train.loop`)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLockedError(
                    f"run directory {self.directory} is in use by {holder}; wait for it to "
                    "finish or choose another output_dir / name"
                ) from None
            except OSError as e:  # file systems without flock: proceed unlocked, say so
                if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                    os.close(fd)
                    raise
                print(f"warning: cannot lock {self.path} ({e.strerror}); running unlocked")
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "argv": sys.argv,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on {info.get('host')} (started {info.get('started')})"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} for a nested dict (lists and scalars are leaves)."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old, new)} for every leaf that differs (missing leaves read as None)."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in patterns)


def check_resume_config(
    directory: str,
    old: dict,
    new: dict,
    *,
    step: int,
    free: Iterable[str],
    warn: Iterable[str] = (),
    force: bool = False,
) -> dict[str, tuple[Any, Any]]:
    """Compare the saved config `old` with `new` when resuming at `step`.

    free: dotted keys (or section prefixes) that may change without changing the result
    (cadences, evaluation sizes, the mesh); warn: keys that change numerics only slightly
    (remat, compute dtype): printed. Any other difference raises ConfigChangedError listing
    them (`old -> new`), unless `force`. Every resume appends {step, time, changes, forced} to
    `config_history.jsonl`. Returns the changes.
    """
    changes = config_changes(old, new)
    free, warn = tuple(free), tuple(warn)
    hard = {k: v for k, v in changes.items() if not _matches(k, free + warn)}
    if hard and not force:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in hard.items())
        raise ConfigChangedError(
            f"resuming {directory} at step {step} with a changed config ({listed}); "
            "use a new output_dir, restore the old values, or force the resume "
            "(resume='force', CLI --force-resume)"
        )
    for k, (a, b) in changes.items():
        if _matches(k, warn):
            print(f"warning: resuming with {k} changed ({a!r} -> {b!r})")
    record = {
        "step": step,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "changes": {k: [a, b] for k, (a, b) in changes.items()},
        "forced": bool(hard),
    }
    with open(os.path.join(directory, HISTORY_NAME), "a") as f:
        f.write(json.dumps(record) + "\n")
    return changes


_BOOKKEEPING = {LOCK_NAME, "config.yaml", "metrics.jsonl", HISTORY_NAME, "checkpoints"}


def remove_if_empty(directory: str) -> bool:
    """Delete a run directory that holds nothing but bookkeeping (lock, config, an empty
    metrics log, no checkpoint): what a run that failed before its first step leaves."""
    if not os.path.isdir(directory):
        return False
    names = set(os.listdir(directory))
    if not names <= _BOOKKEEPING:
        return False
    metrics = os.path.join(directory, "metrics.jsonl")
    if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
        return False
    ckpts = os.path.join(directory, "checkpoints")
    if os.path.isdir(ckpts) and os.listdir(ckpts):
        return False
    shutil.rmtree(directory, ignore_errors=True)
    return True
