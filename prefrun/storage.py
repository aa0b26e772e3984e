"""Files that must never be half there: atomic writes, digests that catch a damaged file before it is read as
data, free space checked before a big write, a full disk (ENOSPC, a quota's EDQUOT) turned into one line, and the
lock that keeps one run per run directory.

A file written with `write_atomic(..., checked=True)` gets a digest beside it (`.<name>.sha256`, written after
the file); `read_checked` returns its bytes only when the digest matches, else None after a line saying so, and
the caller makes the entry again. Caches, pool shards and checkpoints (checkpoint.py's manifest) work this way.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path

from prefrun.errors import PrefrunError

log = logging.getLogger(__name__)

FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(PrefrunError, OSError):
    """No space (or quota) left where prefrun writes; the message names the path and the space needed."""


def disk_full(path: Path, needed: int | None, err: OSError | None = None) -> DiskFull:
    free = free_bytes(path)
    need = f"{_size(needed)} needed, " if needed else ""
    why = "disk quota exceeded" if err is not None and err.errno == errno.EDQUOT else "no space left on the device"
    return DiskFull(f"{path}: {why} ({need}{_size(free)} free): free some space (or point the run elsewhere) and "
                    "run the same command again: what was written before is intact")


def is_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in FULL


FULL_BELOW = 4 << 20  # bytes free under which a write that failed is taken for a full disk


def filled(err: BaseException, path: Path) -> bool:
    """Whether the write that raised `err` under `path` failed because the disk is full: ENOSPC / EDQUOT, or a
    library's own error for it (torch.save raises RuntimeError 'unexpected pos', safetensors a SafetensorError
    'os error 28', without the errno) while the disk has next to nothing free."""
    return is_full(err) or (not isinstance(err, PrefrunError) and free_bytes(path) < FULL_BELOW)


def free_bytes(path: Path) -> int:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def ensure_space(path: Path, needed: int, what: str) -> None:
    """Stop with one line before writing `needed` bytes under `path` when the disk cannot hold them."""
    free = free_bytes(path)
    if needed > free:
        raise DiskFull(f"{path}: {what} needs {_size(needed)} and the disk has {_size(free)} free: free some space "
                       "(or point the run elsewhere) and run the same command again: nothing was written")


def temporary(path: Path) -> Path:
    """A name beside `path` that no other writer uses meanwhile: processes on other hosts sharing a filesystem may
    have this one's PID (containers number them alike), so the host is in it too."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def write_atomic(path: Path, data: bytes | str, *, checked: bool = False) -> None:
    """`data` at `path`, whole or not at all (temporary file, fsync, rename); `checked`: with a digest beside it.
    A full disk is one line (DiskFull) and leaves no temporary file behind."""
    path = Path(path)
    data = data.encode() if isinstance(data, str) else data
    tmp = temporary(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if checked:
            _digest_path(path).unlink(missing_ok=True)  # no stale digest may vouch for the new file
        os.replace(tmp, path)
        if checked:
            write_atomic(_digest_path(path), json.dumps({"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}))
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if is_full(err):
            raise disk_full(path, len(data), err) from None
        raise


def read_checked(path: Path) -> bytes | None:
    """The bytes of a file written with `checked=True`, or None when it is missing or damaged (said in a line)."""
    path = Path(path)
    if not path.exists():
        return None
    data = path.read_bytes()
    try:
        expected = json.loads(_digest_path(path).read_text())
    except (OSError, ValueError):
        log.warning("%s has no readable digest (a write was cut short): it is made again", path)
        return None
    if len(data) != expected["size"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
        log.warning("%s is damaged (%d bytes, %d written; digest differs): it is made again", path, len(data),
                    expected["size"])
        return None
    return data


def file_digest(path: Path, block: int = 1 << 22, sync: bool = False) -> str:
    """The file's SHA-256; `sync`: also make it durable first (fsync), in the same open."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        if sync:
            os.fsync(handle.fileno())
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _digest_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.sha256")


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


class RunLock:
    """One live run per run directory: `<dir>/.lock` names its holder (host, pid, job) and is refreshed every
    `heartbeat_s`. A second run refuses in one line while the holder's heartbeat is fresh; a lock whose
    heartbeat is older than `stale_s` (a killed run) is taken over with a line saying so. The processes of one
    job, and a requeued attempt of the same job, share it: they carry the same job key."""

    def __init__(self, run_dir: Path, job: str, *, heartbeat_s: float = 10.0, stale_s: float = 60.0) -> None:
        self.path, self.job, self.heartbeat_s, self.stale_s = Path(run_dir) / ".lock", job, heartbeat_s, stale_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        holder = self._read()
        if holder and holder.get("job") != self.job:
            age = time.time() - holder.get("heartbeat", 0)
            who = f"host {holder.get('host')}, pid {holder.get('pid')}, job {holder.get('job')}"
            if age < self.stale_s and _maybe_alive(holder):
                raise PrefrunError(f"{self.path.parent} is in use by a live run ({who}, heartbeat {age:.0f} s ago): "
                                   "give this run another directory, or stop that one first")
            log.warning("%s: taking over the lock of a run that is gone (%s, last heartbeat %.0f s ago)",
                        self.path.parent, who, age)
        self._write()
        self._thread = threading.Thread(target=self._beat, name="prefrun-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        holder = self._read()
        if holder and holder.get("job") == self.job and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write()
            except OSError:  # a full disk must not kill the run from a thread; the next beat tries again
                pass

    def _write(self) -> None:
        write_atomic(self.path, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "job": self.job,
                                            "heartbeat": time.time()}))

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None


def _maybe_alive(holder: dict) -> bool:
    """False only when the holder ran on this host and its pid is gone (on another host, trust the heartbeat)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True
