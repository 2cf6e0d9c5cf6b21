"""Where a prepared dataset lives, and reading its files through WebDataset's URL layer.

``data.dir`` (and ``edlm prepare-data --out``'s result, once copied anywhere) may be

* a local folder, ``data/pydoc`` (or a ``file://`` URL);
* an ``http(s)://host/prefix`` URL: the files are ``prefix/manifest.json``, ``prefix/train/shard-000000.tar``,
  ... (WebDataset opens them with ``curl``);
* a ``pipe:COMMAND`` whose ``{}`` is replaced by a file's path inside the dataset, the command writing the
  file to stdout: ``pipe:aws s3 cp s3://bucket/pydoc/{} -``, ``pipe:cat /mnt/data/pydoc/{}``;
* any other scheme WebDataset's ``gopen`` knows (``gs://``, ``ais://``, ...), as a prefix like http.

Every file is opened with :func:`webdataset.gopen.gopen`, so a local path, a URL and a command read the same
bytes through one code path. Local files fail deterministically (missing, corrupt: no retry). A remote read
that fails (connection refused, a transfer cut short, a command's non-zero exit) is retried ``retries``
times with exponential backoff, resuming at the row it had reached, and then raises a :class:`DataError`
naming the URL: nothing is ever skipped silently.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, TypeVar

from webdataset.gopen import gopen

from edlm_dist.errors import ConfigError, DataError

log = logging.getLogger(__name__)
T = TypeVar("T")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Errors that a flaky network or a dying server produce (curl's exit status arrives as OSError).
TRANSIENT_ERRORS = (OSError, EOFError, ValueError)


@dataclass(frozen=True)
class RetryPolicy:
    """How often a failed remote read is retried: ``retries`` times, waiting ``delay_s * 2**k`` before retry k."""

    retries: int = 2
    delay_s: float = 1.0

    def __post_init__(self):
        if self.retries < 0 or self.delay_s < 0:
            raise ConfigError(f"data.read_retries and data.retry_delay_s must be >= 0, got {self.retries} and "
                              f"{self.delay_s}")


def is_remote(location: str | Path) -> bool:
    """True for ``pipe:`` commands and ``scheme://`` URLs other than ``file://``."""
    text = str(location)
    return text.startswith("pipe:") or (bool(_SCHEME.match(text)) and not text.startswith("file://"))


class DataLocation:
    """A dataset's root: maps a relative file name (``train/shard-000000.tar``) to a path or URL."""

    def __init__(self, spec: str | Path):
        text = str(spec)
        if not text:
            raise ConfigError("data.dir is empty; run `edlm prepare-data ... --out DIR` and set data.dir=DIR "
                              "(a folder, an http(s):// URL or a pipe: command)")
        if text.startswith("file://"):
            text = re.sub(r"^file://", "", text)
        self.spec = text
        self.remote = is_remote(text)
        if text.startswith("pipe:") and "{}" not in text:
            raise ConfigError(f"data.dir={text!r} is a pipe: command without {{}}; put {{}} where the file path "
                              "goes, e.g. 'pipe:aws s3 cp s3://bucket/data/{} -'")

    def __str__(self) -> str:
        return self.spec

    def url(self, relative: str) -> str:
        """The path, URL or command that reads ``relative`` (a ``/``-separated path inside the dataset)."""
        if self.spec.startswith("pipe:"):
            return self.spec.replace("{}", relative)
        if self.remote:
            return self.spec.rstrip("/") + "/" + relative
        return str(Path(self.spec) / relative)

    def is_dir(self) -> bool:
        """Local: the folder exists. Remote: assumed (the first read says otherwise)."""
        return self.remote or Path(self.spec).is_dir()

    def open(self, relative: str) -> IO[bytes]:
        """A binary stream of ``relative`` through :func:`webdataset.gopen.gopen`."""
        return gopen(self.url(relative), "rb")

    def read_bytes(self, relative: str, retry: RetryPolicy = RetryPolicy()) -> bytes:
        """The whole file; remote reads are retried (local errors propagate unchanged)."""
        def read() -> bytes:
            stream = self.open(relative)
            try:
                return stream.read()
            finally:
                close_quietly(stream, raise_errors=True)
        if not self.remote:
            return read()
        return with_retries(read, self.url(relative), retry)


def close_quietly(stream: IO[bytes], *, raise_errors: bool = False) -> None:
    """Close a gopen stream. A pipe's close reports the command's exit status: raise it only when asked
    (a stream abandoned half-read makes ``curl``/``cat`` exit on a broken pipe, which is not a failure)."""
    try:
        stream.close()
    except Exception:
        if raise_errors:
            raise


def remote_failure(url: str, attempts: int, err: BaseException) -> DataError:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return DataError(f"cannot read {url} after {attempts} attempt{'s' if attempts > 1 else ''} ({type(err).__name__}: "
                     f"{reason[:300]}); check that the server or command is reachable from every node, or raise "
                     "data.read_retries / data.retry_delay_s")


def backoff(url: str, failures: int, retry: RetryPolicy, err: BaseException) -> None:
    """Raise once ``failures`` exceeds the retries; else log and wait before the next attempt."""
    if failures > retry.retries:
        raise remote_failure(url, failures, err) from err
    wait = retry.delay_s * 2 ** (failures - 1)
    log.warning("reading %s failed (%s: %s); retry %d of %d in %.1f s", url, type(err).__name__,
                str(err).splitlines()[0][:200] if str(err) else "", failures, retry.retries, wait)
    time.sleep(wait)


def with_retries(read: Callable[[], T], url: str, retry: RetryPolicy) -> T:
    """``read()``, retried after transient errors (see :class:`RetryPolicy`)."""
    failures = 0
    while True:
        try:
            return read()
        except TRANSIENT_ERRORS as err:
            failures += 1
            backoff(url, failures, retry, err)


def retry_policy(data_cfg) -> RetryPolicy:
    """The policy of a config's data section (``data.read_retries``, ``data.retry_delay_s``)."""
    return RetryPolicy(int(data_cfg.read_retries), float(data_cfg.retry_delay_s))
