"""Tar I/O of shards: a strict reader of the tars maskdist writes, samples grouped from their
members, and the writer (webdataset's ``TarWriter`` with fixed headers).

The reader is used instead of :mod:`tarfile` (and webdataset's tar iteration, which is built on
it) because it costs about a third per member: the writer makes plain POSIX tars (ustar
headers, a pax header only for a long or non-ASCII name), so one 512-byte header parse per
member is all it takes. ``maskdist bench loader`` measures the margin on every machine
(docs/design.md records the decision). It is strict: a bad checksum or magic, a member type
that would change how later members are read (GNU long names, sparse files, global pax
headers that set a path or size), a size in base-256 or a missing end-of-archive block raises
:class:`~maskdist.shards.format.ShardFormatError`. It never interprets member contents.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import BinaryIO

from maskdist.shards.format import FIELDS, IMAGE_EXT, META_EXT, SKIP_CHUNK, ShardFormatError, split_key

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
REGULAR_TYPES = (b"0", b"\x00", b"7")
DIRECTORY_TYPE = b"5"
_PAX, _PAX_GLOBAL = b"x", b"g"
_LINK_AND_DEVICE_TYPES = (b"1", b"2", b"3", b"4", b"6")


def _tar_number(field: bytes, what: str, where: str) -> int:
    if field[:1] and field[0] & 0x80:
        raise ShardFormatError(f"{where}: {what} in base-256 (a member over 8 GB?) is not supported in shards")
    text = field.split(b"\x00", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ShardFormatError(f"{where}: tar header {what} {text[:12]!r} is not an octal number (not a tar, or damaged)") from None


def _pax_records(data: bytes, where: str) -> dict[str, str]:
    """``"LEN key=value\n"`` records of a pax extended header."""
    records, pos, n = {}, 0, len(data)
    while pos < n:
        if data[pos] == 0:  # padding
            break
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise ShardFormatError(f"{where}: malformed pax header record") from None
        record = data[space + 1:pos + length]
        if length < 1 or space < 0 or not record.endswith(b"\n") or b"=" not in record:
            raise ShardFormatError(f"{where}: malformed pax header record")
        key, value = record[:-1].split(b"=", 1)
        try:
            records[key.decode("utf-8")] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise ShardFormatError(f"{where}: pax header record is not UTF-8") from None
        pos += length
    return records


class TarReader:
    """Members of one tar stream, in order: iterate for ``(name, typeflag, size)``; call
    :meth:`read` for the current member's bytes, or do nothing and they are skipped (seeked
    over where the stream can seek, read through where it cannot: http, ``pipe:``).

    ``where`` names the shard in errors. Iteration ends at the end-of-archive block; a stream
    that ends before it raises ShardFormatError (truncated shard).
    """

    def __init__(self, stream, where: str, seekable: bool | None = None):
        self.stream = stream
        self.where = where
        self.seekable = bool(getattr(stream, "seekable", lambda: False)()) if seekable is None else seekable
        self.offset = 0  # of the next unread byte, for messages
        self._size = 0  # size of the current member
        self._left = 0  # its data + padding not consumed yet

    def _read(self, n: int, what: str) -> bytes:
        data = self.stream.read(n)
        while len(data) < n:  # raw streams may return less than asked for
            more = self.stream.read(n - len(data))
            if not more:
                raise ShardFormatError(f"{self.where}: truncated at byte {self.offset + len(data)} (in {what});"
                                       " re-copy or rebuild the shard")
            data += more
        self.offset += n
        return data

    def _skip(self, n: int) -> None:
        if n <= 0:
            return
        if self.seekable:
            self.stream.seek(n, 1)  # past the end is caught by the next header read
            self.offset += n
            return
        while n > 0:
            step = min(n, SKIP_CHUNK)
            self._read(step, "member data")
            n -= step

    def read(self) -> bytes:
        """The current member's bytes (once)."""
        if self._left == 0 and self._size:
            raise RuntimeError("member data already consumed")
        data = self._read(self._size, "member data") if self._size else b""
        self._skip(self._left - self._size)
        self._left = 0
        return data

    def _header(self) -> tuple[str, bytes, int] | None:
        at = self.offset
        header = self.stream.read(_BLOCK)
        if len(header) < _BLOCK:
            header += self._read(_BLOCK - len(header), "a tar header") if header else b""
        if not header:
            raise ShardFormatError(f"{self.where}: ends at byte {at} without the tar end-of-archive block (truncated);"
                                   " re-copy or rebuild the shard")
        self.offset = at + _BLOCK
        if header == _ZERO_BLOCK:
            return None
        where = f"{self.where}: tar header at byte {at}"
        magic = header[257:265]
        if magic[:5] != b"ustar":
            raise ShardFormatError(f"{where}: no ustar magic (not a tar written by `maskdist shards build`, or damaged)")
        stored = _tar_number(header[148:156], "checksum", where)
        if stored != sum(header) - sum(header[148:156]) + 8 * 32:
            raise ShardFormatError(f"{where}: checksum mismatch (damaged shard)")
        size = _tar_number(header[124:136], "size", where)
        name = header[:100].split(b"\x00", 1)[0]
        if magic == b"ustar\x0000":  # POSIX: a name prefix (in GNU headers these bytes are times)
            prefix = header[345:500].split(b"\x00", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            raise ShardFormatError(f"{where}: member name is not UTF-8") from None
        return text, header[156:157], size

    def __iter__(self) -> Iterator[tuple[str, bytes, int]]:
        pax: dict[str, str] = {}
        while True:
            self._skip(self._left)  # what the caller did not read
            self._left = self._size = 0
            parsed = self._header()
            if parsed is None:
                return
            name, typeflag, size = parsed
            self._size, self._left = size, size + (-size % _BLOCK)
            if typeflag in (_PAX, _PAX_GLOBAL):
                records = _pax_records(self.read(), f"{self.where}: pax header {name!r}")
                odd = [k for k in records if k.startswith("GNU.sparse")]
                if typeflag == _PAX_GLOBAL:
                    odd += [k for k in records if k in ("path", "size")]
                if odd:
                    raise ShardFormatError(f"{self.where}: pax header {name!r} sets {', '.join(sorted(odd))}:"
                                           " not supported in shards (rebuild with `maskdist shards build`)")
                if typeflag == _PAX:
                    pax = records
                continue
            if typeflag not in REGULAR_TYPES and typeflag != DIRECTORY_TYPE and typeflag not in _LINK_AND_DEVICE_TYPES:
                raise ShardFormatError(f"{self.where}: member {name!r} has tar type {typeflag!r}"
                                       " (GNU long name, sparse or vendor extension): not supported in shards;"
                                       " rebuild with `maskdist shards build`")
            if pax:
                name = pax.get("path", name)
                if "size" in pax:
                    try:
                        size = int(pax["size"])
                    except ValueError:
                        raise ShardFormatError(f"{self.where}: member {name!r}: pax size {pax['size']!r} is not a number") from None
                    self._size, self._left = size, size + (-size % _BLOCK)
                pax = {}
            if typeflag not in REGULAR_TYPES:  # directories, links and devices have no data
                self._size = self._left = 0
            yield name, typeflag, size




def iter_samples(stream: BinaryIO, where: str, start: int = 0, stop: int | None = None) -> Iterator[dict]:
    """Raw samples ``{"__key__", "__index__", "jpg", "json"}`` of one tar stream, in order.

    Yields the samples with index in ``[start, stop)``; earlier ones are read past without
    keeping their bytes. Only ``.jpg`` and ``.json`` members are read; any other regular
    member is skipped unread (seeked over where the stream can seek, read through where it
    cannot) and never decoded; a link or device member, or anything the strict reader
    rejects, raises ShardFormatError naming ``where``.
    """
    if stop is not None and stop <= start:
        return
    tar = TarReader(stream, where)
    index, current, current_key = 0, None, None
    for name, typeflag, _size in tar:
        if typeflag not in REGULAR_TYPES:
            if typeflag == DIRECTORY_TYPE:
                continue
            raise ShardFormatError(f"{where}: member {name!r} is a link or device, not a file: shards hold"
                                   " files only (check the set with `maskdist shards verify`)")
        parts = split_key(name)
        if parts is None:
            continue
        key, ext = parts
        if ext not in FIELDS:
            ext = ext.lower()
            if ext not in FIELDS:
                continue
        if key != current_key:
            if current is not None:
                _check_sample(current, where)
                if index >= start:
                    yield current
                index += 1
                if stop is not None and index >= stop:
                    return
            current, current_key = {"__key__": key, "__index__": index}, key
        if ext in current:
            raise ShardFormatError(f"{where}: sample {key!r} has two .{ext} members")
        current[ext] = tar.read() if index >= start else None
    if current is not None:
        _check_sample(current, where)
        if index >= start:
            yield current


def _check_sample(sample: dict, where: str) -> None:
    if IMAGE_EXT not in sample or META_EXT not in sample:
        raise ShardFormatError(f"{where}: sample {sample['__key__']!r} lacks its .{IMAGE_EXT} or .{META_EXT} member")


# --- writing ---------------------------------------------------------------------------------


class ShardTarWriter:
    """One shard tar at a local path, written with webdataset's ``TarWriter``.

    Headers are fixed (mtime 0, mode 0644, uid/gid 0, empty owner names; PAX, the tarfile
    default TarWriter uses) and members come in sorted extension order (``.jpg``, ``.json``),
    so the same samples give byte-identical tars on every machine and with any worker count.
    """

    def __init__(self, path: str):
        from webdataset import TarWriter

        self._file = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._tar = TarWriter(self._file, user="", group="", mode=0o644, mtime=0, encoder=False)

    def write(self, key: str, jpeg: bytes, meta: dict) -> None:
        self._tar.write({"__key__": key, IMAGE_EXT: jpeg,
                         META_EXT: json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")})

    def close(self) -> None:
        try:
            self._tar.close()
        finally:
            self._file.close()
