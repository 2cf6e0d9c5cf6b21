"""The output folder of an ``edlm`` command: checked before any work, then locked while the command runs.

:func:`claim_output` is what every command (``prepare-data``, ``train``, ``sample``, ``eval``,
``pipeline``, ``export-hf``) calls once its config is valid:

* **Check.** ``--out`` must be a folder (or not exist yet) on a writable file system; a file in its place,
  a read-only mount or a folder without write permission is one ``error:`` line before any work starts.
* **Lock.** ``OUT/.edlm-lock`` is held with ``flock`` for as long as the command runs, and holds who took it
  (host, pid, start time, command). A second command on the same folder -- or on a folder inside a locked
  one -- stops at once naming the holder. The kernel drops an ``flock`` when its process dies, even by
  SIGKILL or a lost node (NFSv4 leases expire), so a lock left behind by a killed run is *stale*: it is
  detected (the file is there, nobody holds it), reported in a warning naming the dead run, and taken over.
  Where the file system has no ``flock``, a lock whose holder is a dead process of this host is stale; one
  held from another host is refused with the path to delete once that run is known to be gone.
* **Orphans.** Processes the holder forked (data-loader workers) inherit its ``flock`` and outlive a
  SIGKILL by a few seconds (a worker notices its parent's death within 5 s). A lock still held while its
  recorded holder is dead is waited for, up to ``ORPHAN_WAIT_S``, so that an immediate restart (a Slurm
  requeue) takes it over instead of being refused; past that, the error says who is left holding it.

Only the launch's global rank 0 locks (all ranks of one job write the same folder together).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

from edlm_dist.errors import OutputError
from edlm_dist.storage.files import output_error

LOCK_FILE = ".edlm-lock"
ORPHAN_WAIT_S = 30.0  # > torch's data-loader watchdog interval (5 s) with room for a loaded machine
log = logging.getLogger("edlm")


def check_output_folder(path: str | os.PathLike, *, flag: str = "--out") -> Path:
    """Create ``path`` if needed; :class:`OutputError` when it cannot be an output folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file, not a folder; choose a folder path (it is created if missing)")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{flag} {path} cannot be created: {existing} is a file; choose another folder path")
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        raise OutputError(f"{flag} {path} is on a read-only file system ({existing}); remount it read-write or "
                          "choose another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: no permission to write into {existing}; fix the permissions or choose "
                          "another folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(path, exc, action="create the folder") from None
    return path


def _process_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` in clock ticks since boot (tells a reused pid apart), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_here(holder: dict) -> bool:
    """The recorded holder is a process of this host that has ended (or whose pid now names another process)."""
    if not holder or holder.get("host") != socket.gethostname():
        return False
    pid = int(holder.get("pid") or 0)
    return pid > 0 and pid != os.getpid() and (not _alive(pid) or _process_start(pid) != holder.get("process_start"))


def describe_holder(holder: dict) -> str:
    return (f"`{holder.get('command', '?')}` (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {holder.get('started', '?')})")


def _read_holder(fd: int) -> dict:
    try:
        size = os.fstat(fd).st_size
        holder = json.loads(os.pread(fd, size, 0) or b"{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


class OutputLock:
    """The lock of one output folder (see the module docstring); use :func:`claim_output`."""

    def __init__(self, folder: str | os.PathLike, command: str):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.command = command
        self.fd: Optional[int] = None
        self.stale: Optional[dict] = None  # the dead holder whose lock was taken over

    def acquire(self) -> "OutputLock":
        self._refuse_if_a_parent_is_locked()
        orphans_deadline: Optional[float] = None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise output_error(self.path, exc, action="create the lock") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                if _dead_here(holder):  # its forked children still hold the flock: they exit within seconds
                    orphans_deadline = orphans_deadline or time.monotonic() + ORPHAN_WAIT_S
                    if time.monotonic() < orphans_deadline:
                        time.sleep(0.2)
                        continue
                    raise OutputError(f"{self.folder} is locked by processes left over from {describe_holder(holder)}, "
                                      f"which has ended (its data-loader workers?); stop them (`fuser {self.path}` "
                                      "names them) or choose another --out") from None
                raise OutputError(f"{self.folder} is in use by {describe_holder(holder)}; wait for it to finish or "
                                  "choose another --out (two runs in one folder would mix their files)") from None
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise output_error(self.path, exc, action="lock") from None
                self._check_without_flock(fd)
            try:  # the holder may have released (and deleted) the file between our open and lock: retry
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_holder(fd)
        if previous:
            self.stale = previous
            log.warning("%s held a stale lock of %s, which ended without releasing it (killed?); taking it over",
                        self.folder, describe_holder(previous))
        me = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": self.command}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            raise output_error(self.path, exc, action="write the lock") from None
        self.fd = fd
        return self

    def _check_without_flock(self, fd: int) -> None:
        """No flock on this file system: a recorded holder that is alive (or on another host) keeps it."""
        holder = _read_holder(fd)
        if not holder or holder.get("pid") == os.getpid():
            return
        if _dead_here(holder):
            return  # a dead process of this host (or its pid reused by another): stale
        os.close(fd)
        raise OutputError(f"{self.folder} is in use by {describe_holder(holder)} (this file system has no flock, so "
                          f"a lock from another host cannot be checked); if that run is gone, delete {self.path}")

    def _refuse_if_a_parent_is_locked(self) -> None:
        for parent in self.folder.resolve().parents:
            lock = parent / LOCK_FILE
            if not lock.is_file():
                continue
            try:
                fd = os.open(lock, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                raise OutputError(f"{self.folder} is inside {parent}, which is in use by {describe_holder(holder)}; "
                                  "wait for it to finish or choose a folder outside it") from None
            except OSError:
                pass
            finally:
                os.close(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: nobody can lock the old file after us
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def global_rank() -> int:
    """The launcher's rank of this process (torchrun's RANK, Slurm's SLURM_PROCID), 0 for a single process."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


@contextlib.contextmanager
def claim_output(folder: str | os.PathLike, command: Optional[str] = None, *, flag: str = "--out",
                 lock: bool = True) -> Iterator[Path]:
    """Check ``folder`` and hold its lock (global rank 0 only) until the block ends. A command that fails
    leaves no trace of the folders this created for it (a refused input writes nothing)."""
    created = _missing_folders(Path(folder))
    path = check_output_folder(folder, flag=flag)
    try:
        if not lock or global_rank() != 0:
            yield path
            return
        held = OutputLock(path, command or shlex.join(["edlm", *sys.argv[1:]])).acquire()
        try:
            yield path
        finally:
            held.release()
    except BaseException:
        for made in created:  # deepest first; a folder that holds anything stays
            try:
                made.rmdir()
            except OSError:
                break
        raise


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing
