"""A disk that fills up half-way through a real write, for the writers' failure tests.

:func:`disk_fills_after` makes the files that :func:`fusionseg._atomic.write_atomic` opens accept ``nbytes``
bytes, really written to the temporary file on disk, and then fail with ``OSError(ENOSPC)``, as a full disk does.
Nothing above the file object is stubbed: the writer under test runs its own code (serialising, writing, cleaning
up), so "the previous file is intact and no temporary file is left" is checked, not assumed.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import fusionseg._atomic as atomic


class _FillingFile:
    """A real binary file that takes ``budget`` more bytes, then raises ENOSPC (after writing what fitted)."""

    def __init__(self, f, budget: int, record: dict):
        self._f, self._left, self._record = f, budget, record

    def write(self, b) -> int:
        b = memoryview(b).cast("B")
        if len(b) <= self._left:
            self._left -= len(b)
            return self._f.write(b)
        self._f.write(b[: self._left])
        self._left = 0
        self._f.flush()
        self._record["bytes_on_disk"] = os.fstat(self._f.fileno()).st_size  # the half-written temp file
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def disk_fills_after(monkeypatch, nbytes: int, target: str | None = None, nth: int = 1) -> dict:
    """From now on, the ``nth`` atomic write whose target is named ``target`` (any target if None) fails with
    ENOSPC after ``nbytes`` bytes reached its temporary file. Returns a record, filled when the failure happens:
    ``{"temp": Path of the temporary file, "bytes_on_disk": its size at the failure}``."""
    real = atomic._fdopen
    record: dict = {"calls": 0}

    def fdopen(fd, mode="r", *a, **k):
        f = real(fd, mode, *a, **k)
        temp = Path(os.readlink(f"/proc/self/fd/{fd}"))  # .<target name>.<random>.tmp
        if target is None or temp.name.startswith(f".{target}."):
            record["calls"] += 1
            if record["calls"] == nth:
                record["temp"] = temp
                return _FillingFile(f, nbytes, record)
        return f

    monkeypatch.setattr(atomic, "_fdopen", fdopen)
    return record


def leftovers(folder: Path) -> list[str]:
    """Temporary files left anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*.tmp"))
