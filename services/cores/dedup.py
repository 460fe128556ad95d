"""Which lines of each log file a parse partition has delivered: Filebeat's re-sends dropped.

Filebeat ships at least once: after a failed batch it sends the same lines again, with the same
(host, log.file.path, log.offset). Per file, the marks are the byte ranges of the lines seen so
far, merged (a line's range is [log.offset, log.offset + its bytes); consecutive lines are one
or two bytes apart, their newline). Delivered in order, a file is one range however long it is,
so the marks are tiny and exact — and small enough to be partition state that follows its
partition to another replica (services.state): one changelog entry per file, rewritten when the
file grows.

A file is told from its successor at the same path (rotation, truncation) by Filebeat's file
identity when the record carries one (log.file.fingerprint or inode), else by its first line: a
line at offset 0 whose text differs from the remembered first line starts a new file.
"""
from __future__ import annotations

import zlib
from bisect import bisect_right
from collections import OrderedDict

import msgspec

_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder().decode
MAX_RANGES = 256           # per file: past it the oldest ranges are forgotten (a re-send that old passes)
MAX_FILES = 10_000         # per partition: the least recently active files are forgotten first


class _File:
    __slots__ = ("starts", "ends", "first_crc")

    def __init__(self, first_crc: int | None = None):
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.first_crc = first_crc


class FileMarks:
    """The delivered byte ranges of the files of one input partition."""

    in_order_shortcut = True     # the in-order case without bisect (tests compare it with the general one)

    def __init__(self):
        self._files: OrderedDict[str, _File] = OrderedDict()
        self._dirty: set[str] = set()
        self._dropped: set[str] = set()
        self.duplicates = 0

    @staticmethod
    def file_key(host: str, path: str, identity: str | None) -> str:
        return f"{host}\x00{path}\x00{identity or ''}"

    def seen(self, key: str, offset: int, message: str) -> bool:
        """True (counted) when the line at ``offset`` of file ``key`` was delivered before; else
        it is marked as delivered now."""
        length = (len(message) if message.isascii() else len(message.encode("utf-8", "surrogatepass"))) or 1
        f = self._files.get(key)
        if self.in_order_shortcut and offset and f is not None and f.starts and offset >= f.starts[-1]:
            # the common case, a file read in order: at or past its last range's start
            ends = f.ends
            end = offset + length
            if end <= ends[-1]:
                self.duplicates += 1
                return True
            if offset <= ends[-1] + 2:
                ends[-1] = end
            else:
                f.starts.append(offset)
                ends.append(end)
                if len(ends) > MAX_RANGES:
                    del f.starts[0], ends[0]
            self._files.move_to_end(key)
            self._dirty.add(key)
            return False
        if offset == 0:
            crc = zlib.crc32(message.encode("utf-8", "surrogatepass"))
            if f is not None and f.first_crc is not None and f.first_crc != crc:
                f = None                    # another file at the same path: start afresh
            if f is None:
                f = self._files[key] = _File(crc)
            elif f.first_crc is None:
                f.first_crc = crc
        elif f is None:
            f = self._files[key] = _File()
        self._files.move_to_end(key)
        starts, ends = f.starts, f.ends
        end = offset + length
        i = bisect_right(starts, offset) - 1
        if i >= 0 and end <= ends[i]:
            self.duplicates += 1
            return True
        # merge with the range before (its newline is 1 or 2 bytes) and the ones it reaches
        if i >= 0 and offset <= ends[i] + 2:
            ends[i] = max(ends[i], end)
            j = i
        else:
            j = i + 1
            starts.insert(j, offset)
            ends.insert(j, end)
        while j + 1 < len(starts) and starts[j + 1] <= ends[j] + 2:
            ends[j] = max(ends[j], ends[j + 1])
            del starts[j + 1], ends[j + 1]
        if len(starts) > MAX_RANGES:
            del starts[0], ends[0]
        self._dirty.add(key)
        if len(self._files) > MAX_FILES:
            old, _ = self._files.popitem(last=False)
            self._dropped.add(old)
            self._dirty.discard(old)
        return False

    # state (services.state)
    def _record(self, f: _File) -> bytes:
        return _pack((f.first_crc, f.starts, f.ends))

    def changes(self) -> dict[bytes, bytes | None]:
        out: dict[bytes, bytes | None] = {k.encode("utf-8", "surrogatepass"): None for k in self._dropped}
        for key in self._dirty:
            f = self._files.get(key)
            if f is not None:
                out[key.encode("utf-8", "surrogatepass")] = self._record(f)
        self._dirty.clear()
        self._dropped.clear()
        return out

    def entries(self) -> dict[bytes, bytes]:
        return {k.encode("utf-8", "surrogatepass"): self._record(f) for k, f in self._files.items()}

    def restore(self, entries: dict[bytes, bytes]) -> None:
        self._files.clear()
        for key, value in entries.items():
            try:
                first_crc, starts, ends = _unpack(value)
            except (msgspec.DecodeError, ValueError, TypeError):
                continue                         # an unreadable mark only lets a re-send through
            f = _File(first_crc)
            f.starts, f.ends = list(starts), list(ends)
            self._files[key.decode("utf-8", "surrogatepass")] = f
        self._dirty.clear()
        self._dropped.clear()
