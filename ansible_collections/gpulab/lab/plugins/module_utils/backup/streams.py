# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""Byte streams through the zstd and tar programs, and a tar reader and writer of our own: zstd's levels, the
decompressed content of stored blobs (BlobReader, or unpack_to straight into a file), a tar stream read member by
member (TarReader), tar headers and members written by hand, and `tar --create` of a path as a stream (TarOf).

Knows nothing of the store's layout, of manifests or of Docker: callers give paths and streams. Standard library only,
plus the zstd and tar programs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tarfile
import tempfile

from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import CHUNK, BackupError
from ansible_collections.gpulab.lab.plugins.module_utils.files import find_program, grow_pipe

BLOCK = 512
ZERO_BLOCK = b"\0" * BLOCK


def zstd_program():
    program = find_program("zstd")
    if not program:
        raise BackupError("the backup store compresses with the zstd program, which this machine lacks: install zstd")
    return program


def zstd_level(level):
    """zstd's option for a level: 1..19 (-1 .. -19), or -1..-7 for its fast levels (--fast=1 .. --fast=7)."""
    level = int(level)
    if 1 <= level <= 19:
        return f"-{level}"
    if -7 <= level <= -1:
        return f"--fast={-level}"
    raise BackupError(f"compression_level must be 1 to 19, or -1 to -7 for zstd's fast levels, not {level}")


def tar_program():
    program = find_program("tar")
    if not program:
        raise BackupError("archiving the bind-mounted folders needs the tar program, which this machine lacks")
    return program


class BlobReader:
    """The uncompressed content of one or more zstd files, such as blobs (concatenated), from `zstd -dc`, read in
    chunks (one zstd for each BATCH_PATHS files: a layer of thousands of chunks stays within the limits of a command
    line)."""

    BATCH_PATHS = 512

    def __init__(self, paths):
        self.paths = list(paths)
        self.next = 0
        self.proc = None
        self._start()

    def _start(self):
        batch = self.paths[self.next : self.next + self.BATCH_PATHS]
        self.next += len(batch)
        self.batch = batch
        self.err = tempfile.TemporaryFile()  # noqa: SIM115 (closed in _end; not a pipe: zstd never blocks on it)
        self.proc = subprocess.Popen(
            [zstd_program(), "-dcq", "--", *batch], stdout=subprocess.PIPE, stderr=self.err, bufsize=0
        )
        grow_pipe(self.proc.stdout.fileno())

    def _end(self, check=True):
        if not check and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.kill()
        self.proc.stdout.close()
        rc = self.proc.wait()
        self.err.seek(0)
        err = self.err.read().decode(errors="replace").strip()[-2000:]
        self.err.close()
        # SIGPIPE: the reader stopped before the end (it reports its own reason), not a fault of zstd or the blobs.
        if check and rc not in (0, -signal.SIGPIPE):
            what = self.batch[0] if len(self.batch) == 1 else f"{len(self.batch)} blobs from {self.batch[0]}"
            raise BackupError(f"zstd could not decompress {what}: {err or f'exit status {rc}'}")

    def pipe(self):
        """zstd's output, for another process to read directly: only when one zstd takes all the blobs."""
        if len(self.paths) > self.BATCH_PATHS:
            self.close(check=False)
            raise BackupError(f"{len(self.paths)} blobs are more than one zstd process reads ({self.BATCH_PATHS})")
        return self.proc.stdout

    def read(self, size=CHUNK):
        while True:
            data = self.proc.stdout.read(size)
            if data or self.next >= len(self.paths):
                return data
            self._end()
            self._start()

    def readinto(self, view):
        """Fill view (a writable memoryview) from the stream; returns the bytes put there (fewer only when the
        stream ends)."""
        have = 0
        while have < len(view):
            n = self.proc.stdout.readinto(view[have:])
            if n:
                have += n
                continue
            if self.next >= len(self.paths):
                break
            self._end()
            self._start()
        return have

    def chunks(self):
        return iter(self.read, b"")

    def copy_to(self, fd, size):
        """The next size bytes of the stream written to the file descriptor fd: spliced from zstd's pipe into the
        file where the system can (no copy through Python), else read and written. Returns the bytes copied (fewer
        only when the stream ends)."""
        splice = getattr(os, "splice", None)
        left = size
        while left:
            if splice is not None:
                n = splice(self.proc.stdout.fileno(), fd, left)
            else:
                data = self.proc.stdout.read(min(left, CHUNK))
                n = len(data)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            if n:
                left -= n
                continue
            if self.next >= len(self.paths):
                break
            self._end()
            self._start()
        return size - left

    def close(self, check=True):
        self._end(check)


def unpack_to(fd, paths):
    """The uncompressed content of zstd files (blobs), concatenated, written to the file descriptor fd by zstd itself
    (fd is its standard output: no pipe, no copy through Python), from fd's offset on; one zstd for each
    BlobReader.BATCH_PATHS files. Raises BackupError with zstd's message when it fails."""
    paths = list(paths)
    for first in range(0, len(paths), BlobReader.BATCH_PATHS):
        batch = paths[first : first + BlobReader.BATCH_PATHS]
        with tempfile.TemporaryFile() as err:
            rc = subprocess.run([zstd_program(), "-dcq", "--", *batch], stdout=fd, stderr=err, check=False).returncode
            if rc:
                err.seek(0)
                message = err.read().decode(errors="replace").strip()[-2000:]
                what = batch[0] if len(batch) == 1 else f"{len(batch)} blobs from {batch[0]}"
                raise BackupError(f"zstd could not decompress {what}: {message or f'exit status {rc}'}")


def padding(size):
    return (BLOCK - size % BLOCK) % BLOCK


def _parse_pax(data):
    """The records of a pax extended header: {keyword: value}."""
    records, pos = {}, 0
    try:
        while pos < len(data) and data[pos : pos + 1] != b"\0":
            space = data.index(b" ", pos)
            length = int(data[pos:space])
            record = data[space + 1 : pos + length - 1]
            key, _equals, value = record.partition(b"=")
            records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
            pos += length
    except ValueError as e:
        raise BackupError(f"the archive has a corrupt pax header: {e}") from e
    return records


class Member:
    __slots__ = ("linkname", "name", "size", "type")

    def __init__(self, name, type_, size, linkname):
        self.name = name
        self.type = type_
        self.size = size
        self.linkname = linkname

    def isfile(self):
        return self.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)


class TarReader:
    """Reads a tar stream member by member without holding a member in memory (tarfile's stream mode copies every
    block through its own small buffer). Handles ustar, GNU long names and pax headers, as Go's archive/tar (Docker)
    and GNU tar write them. sink, when given, receives every byte read from the stream (a raw copy)."""

    def __init__(self, stream, sink=None, what="the archive"):
        self.stream = stream
        self.sink = sink
        self.what = what
        self.buf = b""
        self.off = 0
        self.pos = 0  # bytes of the tar consumed
        self.bytes_read = 0  # bytes read from the stream
        self.end_offset = None  # where the end-of-archive blocks start
        self._left = 0

    def _pull(self, size):
        block = self.stream.read(size)
        if block:
            self.bytes_read += len(block)
            if self.sink:
                self.sink(block)
        return block

    def _exact(self, size, eof_ok=False):
        if len(self.buf) - self.off < size:
            parts = [self.buf[self.off :]]
            have = len(parts[0])
            while have < size:
                block = self._pull(max(CHUNK, size - have))
                if not block:
                    if eof_ok and have == 0:
                        return None
                    raise BackupError(f"{self.what} ends in the middle (truncated after {self.pos + have} bytes)")
                parts.append(block)
                have += len(block)
            self.buf, self.off = b"".join(parts), 0
        data = self.buf[self.off : self.off + size]
        self.off += size
        self.pos += size
        return data

    def data(self):
        """The current member's content, in chunks of at most 1 MiB."""
        while self._left > 0:
            if self.off < len(self.buf):
                take = min(self._left, len(self.buf) - self.off)
                piece = self.buf[self.off : self.off + take]
                self.off += take
            else:
                piece = self._pull(min(CHUNK, self._left))
                if not piece:
                    raise BackupError(f"{self.what} ends in the middle of a member (truncated)")
            self._left -= len(piece)
            self.pos += len(piece)
            yield piece

    def _skip(self, size):
        self._left = size
        for _piece in self.data():
            pass

    def members(self):
        """Yield each member; its content is read with data() before the next one (what is left is skipped)."""
        extra = {}
        while True:
            header = self._exact(BLOCK, eof_ok=True)
            if header is None:
                raise BackupError(f"{self.what} has no end-of-archive marker (truncated)")
            if header == ZERO_BLOCK:
                self.end_offset = self.pos - BLOCK
                while self._pull(CHUNK):  # the rest of the stream: end blocks and record padding
                    pass
                return
            try:
                info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
            except tarfile.TarError as e:
                raise BackupError(f"{self.what} has a corrupt tar header at byte {self.pos - BLOCK}: {e}") from e
            if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE):
                data = self._exact(info.size + padding(info.size))[: info.size]
                if info.type != tarfile.XGLTYPE:
                    extra.update(_parse_pax(data))
                continue
            if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
                data = self._exact(info.size + padding(info.size))[: info.size]
                key = "path" if info.type == tarfile.GNUTYPE_LONGNAME else "linkpath"
                extra[key] = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
                continue
            size = int(extra["size"]) if "size" in extra else info.size
            member = Member(
                clean_name(extra.get("path") or info.name), info.type, size, extra.get("linkpath") or info.linkname
            )
            extra = {}
            has_data = member.isfile() or member.type not in tarfile.SUPPORTED_TYPES
            self._left = size if has_data else 0
            yield member
            self._skip(self._left)
            if has_data:
                self._skip(padding(size))


def clean_name(name):
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/").rstrip("/")


def tar_header(name, size, mode=0o644):
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = mode
    info.mtime = 0
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape")


def tar_member(name, data):
    return tar_header(name, len(data)) + data + b"\0" * padding(len(data))


# ---- reading `docker save` into the store --------------------------------------------------------------------------


TAR_CREATE = [
    "--create",
    "--file=-",
    "--directory=/",
    "--numeric-owner",
    "--sparse",
    "--xattrs",
    "--xattrs-include=*",
    "--format=posix",
    "--pax-option=delete=atime,delete=ctime",
    "--sort=name",
    "--warning=no-file-changed",
]
TAR_EXTRACT = [
    "--extract",
    "--file=-",
    "--directory=/",
    "--numeric-owner",
    "--same-owner",
    "--preserve-permissions",
    "--xattrs",
    "--xattrs-include=*",
]


class TarOf:
    """`tar --create` of one path, as a readable stream; close() checks tar's exit status (1: a file changed while it
    was read, which is a warning for a folder in use)."""

    def __init__(self, path):
        self.path = path
        self.err = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close(); a pipe could fill and block tar)
        self.proc = subprocess.Popen(
            [tar_program(), *TAR_CREATE, "--", path.lstrip("/")], stdout=subprocess.PIPE, stderr=self.err, bufsize=0
        )
        grow_pipe(self.proc.stdout.fileno())

    def chunks(self):
        return iter(lambda: self.proc.stdout.read(CHUNK), b"")

    def close(self):
        self.proc.stdout.close()
        rc = self.proc.wait()
        self.err.seek(0)
        err = self.err.read().decode(errors="replace").strip()[-1000:]
        self.err.close()
        if rc not in (0, 1):
            raise BackupError(f"tar could not archive {self.path}: {err or f'exit status {rc}'}")
        return f"{self.path} changed while it was archived: {err}" if rc == 1 else None
