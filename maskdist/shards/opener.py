"""Open files of a shard set wherever it lives, through ``webdataset.gopen``, and keep reading
through transient failures.

A location is a local folder, an ``http(s)://`` URL, a ``pipe:CMD`` template with ``{}`` for
the path inside the set, or any other URL scheme ``gopen`` has a handler for (``gs://``,
``ais://``, ...). :func:`open_file` returns a :class:`ResumableStream`: a plain binary stream
whose reads retry transient failures of remote files (connection errors, HTTP 5xx, a pipe
command that exits non-zero, a stream that ends before the manifest's byte count) with
exponential backoff, bounded by one :class:`RetryPolicy`. A retry continues at the byte where
the read stopped: an http(s) file is asked for the rest with a Range request (curl ``-C``); a
server without ranges, a pipe and other schemes are re-read from the start and the bytes
already delivered are skipped (read, not decoded). Local files are not retried: a short or
unreadable local file is damaged, not flaky.

http(s) goes through ``gopen``'s ``pipe:`` handler with a curl command built here rather than
through its http handler, which runs curl with 30 retries of its own and no way to continue at
an offset: here one policy, configurable, governs every remote read.
"""
from __future__ import annotations

import io
import logging
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from maskdist.errors import MaskdistError
from maskdist.shards.format import SKIP_CHUNK
from maskdist.system import network

log = logging.getLogger(__name__)

HTTP_CONNECT_TIMEOUT_S = 30
HTTP_STALL_S = 60  # a transfer slower than 1 byte/s for this long counts as a dropped connection
# curl's exit codes (with --fail) that say why a transfer stopped.
_CURL_EXIT = {6: "host not found", 7: "connection refused", 18: "connection dropped mid-file", 22: "HTTP error status (400 or more)",
              28: "timed out", 33: "the server does not support byte ranges", 35: "TLS handshake failed",
              52: "empty reply", 55: "send failed", 56: "connection reset"}
_CURL_NO_RANGES = 33
_CURL_NO_CONNECTION = (6, 7)  # host not found, could not connect: maybe no network at all


class ShardReadError(MaskdistError):
    """A file of a shard set could not be read from its location (after the retries allowed)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How remote reads retry: up to ``tries`` attempts in a row without progress (the first
    included), waiting ``backoff_s``, then twice that, ... at most ``max_backoff_s`` between them."""

    tries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    def __post_init__(self):
        if self.tries < 1 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise MaskdistError(f"read retries: tries {self.tries} must be 1 or more and backoff {self.backoff_s} s 0 or more")

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failure in a row (1, 2, ...)."""
        return min(self.backoff_s * 2 ** (failures - 1), self.max_backoff_s)


NO_RETRY = RetryPolicy(tries=1)


def is_pipe(location: str) -> bool:
    return location.startswith("pipe:")


def is_url(location: str) -> bool:
    """A URL with a scheme other than ``file:`` (http(s), gs, ais, ...); not a local path."""
    scheme = urlparse(location).scheme
    return len(scheme) > 1 and scheme != "file" and not is_pipe(location)


def is_http(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def location_kind(location: str) -> str:
    return "pipe" if is_pipe(location) else "http" if is_http(location) else "url" if is_url(location) else "local"


def resolve(location: str, relpath: str) -> str:
    """The local path, URL or ``pipe:`` command of a file inside the set at ``location``."""
    if is_pipe(location):
        return location.replace("{}", shlex.quote(relpath))  # a plain path stays as it is
    if is_url(location):
        return location.rstrip("/") + "/" + relpath
    if location.startswith("file:"):
        location = urlparse(location).path
    return str((Path(location) / relpath).resolve())


def _gopen(target: str):
    from webdataset import gopen

    return gopen(target, "rb")


def _curl(url: str, offset: int) -> str:
    """A ``pipe:`` command that writes ``url`` from byte ``offset`` on to stdout."""
    resume = f" -C {offset}" if offset else ""
    return (f"pipe:curl --fail --silent --location --connect-timeout {HTTP_CONNECT_TIMEOUT_S}"
            f" --speed-limit 1 --speed-time {HTTP_STALL_S}{resume} -- {shlex.quote(url)}")


class _Transient(Exception):
    """A failure worth another try."""


class ResumableStream(io.RawIOBase):
    """A read-only binary stream of one file of a shard set (see the module docstring).

    ``expected_size``: the file's byte count from the manifest (None: unknown, the end of the
    stream is the end of the file). ``where`` names the file in messages.
    """

    def __init__(self, target: str, kind: str, where: str, expected_size: int | None = None,
                 policy: RetryPolicy | None = None):
        super().__init__()
        self.target, self.kind, self.where = target, kind, where
        self.expected_size = expected_size
        self.policy = policy or RetryPolicy()
        self.pos = 0
        self.retries = 0  # transient failures recovered from
        self._raw = None
        self._ranges = kind == "http"  # until a server says it has none
        self._open()

    # --- opening ------------------------------------------------------------------------

    def _open(self) -> None:
        """Open at ``self.pos``; retries transient failures of remote files."""
        failures = 0
        while True:
            try:
                self._raw = self._open_at(self.pos)
                return
            except _Transient as err:
                failures = self._failed(failures, str(err))

    def _open_at(self, offset: int):
        if self.kind == "local":
            try:
                raw = open(self.target, "rb")  # noqa: SIM115 (closed by close())
            except OSError as err:
                raise ShardReadError(f"{self.where}: {err.strerror or err}") from None
            if self.expected_size is not None:
                size = os.fstat(raw.fileno()).st_size
                if size != self.expected_size:
                    raw.close()
                    raise ShardReadError(f"{self.where}: {size} bytes, the manifest says {self.expected_size}"
                                         " (truncated or replaced); re-copy the set or rebuild it")
            raw.seek(offset)
            return raw
        ranged = self.kind == "http" and self._ranges and offset > 0
        command = _curl(self.target, offset if ranged else 0) if self.kind == "http" else self.target
        try:
            raw = _gopen(command)
        except (OSError, ValueError) as err:
            raise _Transient(f"cannot open ({err})") from None
        if offset and not ranged:  # re-read from the start: skip what was delivered, undecoded
            left = offset
            while left > 0:
                data = self._raw_read(raw, min(left, SKIP_CHUNK))
                if not data:
                    self._end_of_stream(raw, offset - left)
                left -= len(data)
        return raw

    def _failed(self, failures: int, why: str) -> int:
        """Count a transient failure in a row; wait, or raise when the policy is spent."""
        failures += 1
        if self.kind == "local" or failures >= self.policy.tries:
            tries = "" if self.kind == "local" else f" ({failures} tries)"
            raise ShardReadError(f"{self.where}: {why} at byte {self.pos}{tries}; check the location, or re-copy the set"
                                 " (`maskdist shards verify` checks it)")
        delay = self.policy.delay(failures)
        log.warning("warning: %s: %s at byte %d; retry %d of %d in %.1f s", self.where, why, self.pos, failures,
                    self.policy.tries - 1, delay)
        self.retries += 1
        time.sleep(delay)
        return failures

    # --- reading ------------------------------------------------------------------------

    def _raw_read(self, raw, n: int) -> bytes:
        # gopen's Pipe.read raises as soon as its command has exited non-zero, dropping the
        # bytes it has just read (a dropped connection's last delivered part): read the pipe
        # itself, and judge the exit status at the end of the stream (_end_of_stream).
        source = raw.stream if getattr(raw, "proc", None) is not None else raw
        try:
            return source.read(n)
        except OSError as err:
            status = _exit_status(raw)
            if not status:
                raise _Transient(f"read failed ({err})") from None
            self._command_failed(status)

    def _command_failed(self, status: int) -> None:
        if status == _CURL_NO_RANGES and self.kind == "http":
            self._ranges = False  # from now on: re-read from the start and skip
        if status in _CURL_NO_CONNECTION and self.kind == "http":
            no_network = network.unreachable(self.target)
            if no_network:  # retries cannot succeed
                raise ShardReadError(f"{self.where}: {no_network}; nothing was retried: read the set from where the"
                                     " network reaches it, or copy it to a local folder")
        raise _Transient(_describe_status(status, self.kind))

    def _end_of_stream(self, raw, at: int) -> None:
        """Judge an end of stream at byte ``at``: a remote stream must end where the manifest
        says and its command must exit 0; raises _Transient otherwise."""
        status = _exit_status(raw)
        if status not in (None, 0):
            self._command_failed(status)
        if self.expected_size is not None and at < self.expected_size:
            raise _Transient(f"stream ended after {at} of {self.expected_size} bytes")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.kind == "local"

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if self.kind != "local":
            raise io.UnsupportedOperation("remote shard streams are read in order")
        self.pos = self._raw.seek(offset, whence)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        failures = 0
        view = memoryview(buffer).cast("B")
        while True:
            try:
                if self._raw is None:
                    self._raw = self._open_at(self.pos)
                data = self._raw_read(self._raw, len(view))
                if not data and self.kind != "local":
                    self._end_of_stream(self._raw, self.pos)
                n = len(data)
                view[:n] = data
                self.pos += n
                return n
            except _Transient as err:
                self._close_raw()
                failures = self._failed(failures, str(err))

    def _close_raw(self) -> None:
        raw, self._raw = self._raw, None
        if raw is None:
            return
        proc = getattr(raw, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()  # a reader that stops early does not wait for the command
        try:
            if proc is not None:
                raw.stream.close()
                proc.wait()
            else:
                raw.close()
        except OSError:
            pass

    def close(self) -> None:
        if not self.closed:
            self._close_raw()
        super().close()


def _exit_status(raw) -> int | None:
    proc = getattr(raw, "proc", None)
    if proc is None:
        return None
    try:
        return proc.wait(timeout=HTTP_CONNECT_TIMEOUT_S)
    except Exception:  # noqa: BLE001 (still running after its output closed: treat as a failure)
        proc.kill()
        return -9


def _describe_status(status: int, kind: str) -> str:
    if kind == "http" and status in _CURL_EXIT:
        return f"{_CURL_EXIT[status]} (curl exit {status})"
    return f"command exited with status {status}"


def open_file(location: str, relpath: str, expected_size: int | None = None, policy: RetryPolicy | None = None) -> ResumableStream:
    """A stream of the file ``relpath`` of the set at ``location``; raises ShardReadError."""
    target = resolve(location, relpath)
    where = relpath if location_kind(location) == "local" else target.removeprefix("pipe:")
    return ResumableStream(target, location_kind(location), where, expected_size, policy)
