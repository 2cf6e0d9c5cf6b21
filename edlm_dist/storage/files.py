"""The one write path of edlm-dist: atomic files, crash-safe appends, folders swapped in whole.

Every file the package writes goes through here (``tests/test_storage.py`` checks that no other module
writes, replaces or appends on its own), so three promises hold everywhere:

* **Atomic files** (:func:`write_atomic`): the bytes go to ``NAME.tmp`` in the same folder, are flushed
  to disk, and replace ``NAME`` with one rename. A reader sees the old file or the new one, never half.
* **Crash-safe appends** (:func:`append_line`): a JSONL row is appended whole or not at all. A write that
  fails half-way (disk full, file-size limit, read-only remount) is cut back to the previous end; a torn
  last line left by a process killed mid-write is repaired by the next append, and skipped by
  :func:`read_jsonl`.
* **Folders swapped in whole** (:func:`swap_in`): a new folder is built aside and moved into place; the
  old one is moved aside first and deleted only once the new one is in place.

A failed write raises :class:`~edlm_dist.errors.OutputError` with one line naming the path, the reason
(``No space left on device``, ``Read-only file system``, ...) and the fix, never a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from edlm_dist.errors import DataError, EdlmError, OutputError

FIXES = {
    errno.ENOSPC: "free disk space",
    errno.EDQUOT: "free disk space or raise the quota",
    errno.EFBIG: "the file-size limit (ulimit -f) was reached; raise it",
    errno.EROFS: "the file system is read-only; remount it read-write or choose another output folder",
    errno.EACCES: "fix the folder's permissions or choose another output folder",
    errno.EPERM: "fix the folder's permissions or choose another output folder",
    errno.ENOTDIR: "a file stands where a folder is needed; move it or choose another output folder",
    errno.EISDIR: "a folder stands where a file is needed; move it or choose another output folder",
}


def output_error(path: str | os.PathLike, exc: OSError, *, action: str = "write",
                 after: str = "") -> OutputError:
    """One line for a failed write: the path, the operating system's reason and the fix."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    fix = FIXES.get(exc.errno or 0, "check the file system")
    return OutputError(f"could not {action} {path} ({reason}); {fix}{'; ' + after if after else ''}")


def diagnose_write_failure(folder: str | os.PathLike) -> Optional[str]:
    """Why a write into ``folder`` failed, read from the file system's state, for writers that lose the
    operating system's reason (``torch.save`` reports a full disk or a file-size limit as a RuntimeError):
    a read-only mount, under 1 MiB free, or a finite file-size limit (``ulimit -f``). None if none applies."""
    try:
        stat = os.statvfs(folder)
    except OSError:
        return None
    if stat.f_flag & os.ST_RDONLY:
        return f"{os.strerror(errno.EROFS)}; {FIXES[errno.EROFS]}"
    if stat.f_bavail * stat.f_frsize < 2**20:
        return f"{os.strerror(errno.ENOSPC)}; {FIXES[errno.ENOSPC]}"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        return f"{os.strerror(errno.EFBIG)}: the file-size limit (ulimit -f) is {limit} bytes; raise it"
    return None


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: str | bytes, *, after: str = "") -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through ``NAME.tmp``, fsync and one rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        remove_quietly(tmp)
        raise output_error(path, exc, after=after) from None
    _fsync_folder(path.parent)
    return path


def write_json_atomic(path: str | os.PathLike, payload: Any, *, indent: Optional[int] = 1,
                      sort_keys: bool = False) -> Path:
    """``payload`` as JSON with one trailing newline, written atomically."""
    return write_atomic(path, json.dumps(payload, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n")


def write_with(path: str | os.PathLike, writer: Callable[[Path], Any], *, after: str = "") -> Path:
    """Atomically create ``path`` with a library writer (``writer(tmp_path)``: safetensors, torch.save,
    savefig, a tokenizer's save): it writes ``NAME.tmp``, which then replaces ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        writer(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        remove_quietly(tmp)
        raise output_error(path, exc, after=after) from None
    except (RuntimeError, EdlmError):  # torch.save reports ENOSPC as RuntimeError; the writer said why
        remove_quietly(tmp)
        raise
    return path


def remove_quietly(path: str | os.PathLike) -> None:
    """Delete a file or folder that may be half-written; errors ignored (the caller reports the cause)."""
    path = Path(path)
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


# ------------------------------------------------------------------------------------ appends
def _complete_length(fd: int, size: int) -> int:
    """Bytes up to and including the last newline of the open file (0 when it holds none)."""
    position = size
    while position > 0:
        start = max(0, position - 4096)
        block = os.pread(fd, position - start, start)
        newline = block.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        position = start
    return 0


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (a newline is added) whole or not at all; see the module docstring."""
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise output_error(path, exc) from None
    size = 0
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # torn by a kill mid-write: drop the fragment
            size = _complete_length(fd, size)
            os.ftruncate(fd, size)
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
    except OSError as exc:
        try:
            os.ftruncate(fd, size)  # no half line stays behind
        except OSError:
            pass
        raise output_error(path, exc, action="append to") from None
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------ readers
def read_jsonl(path: str | os.PathLike, *, fix: str) -> list[dict]:
    """The rows of a JSONL file. A last line cut short by a crash (no newline, not JSON) is skipped; any
    other malformed line is a :class:`DataError` naming the file, the line and ``fix``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror or exc}); {fix}") from None
    lines = raw.split(b"\n")
    torn = lines[-1] if lines[-1].strip() else None  # text after the last newline: an unfinished row
    rows = []
    for number, line in enumerate(lines[:-1], start=1):
        if line.strip():
            rows.append(_json_row(line, path, number, fix))
    if torn is not None:
        try:
            rows.append(_json_row(torn, path, len(lines), fix))
        except DataError:
            pass  # the torn tail of a killed writer: the row was never complete
    return rows


def _json_row(line: bytes, path: Path, number: int, fix: str) -> dict:
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} line {number} is not valid JSON ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0]}); {fix}") from None
    if not isinstance(row, dict):
        raise DataError(f"{path} line {number} is not a JSON object; {fix}")
    return row


def read_json(path: str | os.PathLike, *, what: str, fix: str, required: Iterable[str] = (),
              error: type[EdlmError] = DataError) -> dict:
    """A JSON object file with ``required`` keys (dotted for nested ones: ``"tokenizer.mask_id"``), or one
    ``error`` line naming ``what``, the problem and ``fix``: never a KeyError or JSONDecodeError."""
    path = Path(path)
    try:
        payload = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise error(f"{what} {path} is missing; {fix}") from None
    except OSError as exc:
        raise error(f"{what} {path} is unreadable ({exc.strerror or exc}); {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{what} {path} is not valid JSON (corrupt or truncated: {str(exc).splitlines()[0]}); "
                    f"{fix}") from None
    if not isinstance(payload, dict):
        raise error(f"{what} {path} is not a JSON object; {fix}")
    missing = [key for key in required if not has_key(payload, key)]
    if missing:
        raise error(f"{what} {path} lacks the key{'s' if len(missing) > 1 else ''} "
                    f"{', '.join(repr(k) for k in missing)}; {fix}")
    return payload


def has_key(payload: dict, dotted: str) -> bool:
    node: Any = payload
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


# ------------------------------------------------------------------------------------ folders
def swap_in(built: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the finished folder ``built`` to ``target``. An existing ``target`` is first renamed to
    ``.NAME.old`` and deleted only after ``built`` is in place (restored if the move fails)."""
    built, target = Path(built), Path(target)
    old = target.with_name(f".{target.name}.old")
    try:
        if target.exists():
            remove_quietly(old)
            os.replace(target, old)
        try:
            os.replace(built, target)
        except OSError:
            if old.exists() and not target.exists():
                os.replace(old, target)
            raise
    except OSError as exc:
        raise output_error(target, exc, action="replace") from None
    remove_quietly(old)
    return target


def swap_in_entries(built: str | os.PathLike, target: str | os.PathLike, names: Iterable[str], *,
                    marker: str, aside: str = ".replaced") -> None:
    """Replace the entries ``names`` of ``target`` by those of ``built``, the folder ``target`` itself
    staying in place (it may hold a lock). ``marker`` (the file whose presence means "complete") goes
    aside first and comes in last; the old entries wait in ``target/aside`` until the new ones are in."""
    built, target = Path(built), Path(target)
    old = target / aside
    try:
        remove_quietly(old)
        old.mkdir()
        for name in [marker, *names]:
            if (target / name).exists():
                os.replace(target / name, old / name)
        for name in [*names, marker]:
            if (built / name).exists():
                os.replace(built / name, target / name)
    except OSError as exc:
        raise output_error(target, exc, action="replace the contents of",
                           after=f"the previous contents are in {old}") from None
    remove_quietly(old)
    remove_quietly(built)
