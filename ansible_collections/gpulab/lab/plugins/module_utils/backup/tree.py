# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""A work directory (a bind-mount source) stored as content-defined chunks with a listing, read incrementally, and
restored from them; and the stat cache that tells a backup which files of a tree (a work directory, or a container's
writable layer) changed since the previous backup.

A tree's backup (archive_tree) walks its metadata and reads only the files that are new or changed since the previous
backup, as restic and borg do: a file is taken from the previous backup (its chunks, which the store still has: the
store's blob index says so) only when its size, mtime, ctime, inode, link count, mode and owner are those the stat
cache recorded, its mtime is not in the future and it had settled when it was read. The content of the files read goes
through blobs.ChunkedLayerWriter (overlay's MemberChunker: a large file in pieces counted from its start, small files
together): each chunk is a blob of the store's blob space, stored once for every backup and every container (two
students with the same dataset store it once). The listing (every path's type, mode, owner, mtime, xattrs, symlink
target, hard link, and the chunk ranges of its content) is itself cut into small chunks, so that a small change
rewrites a small part of it. A mount entry of format "tree" names the listing's blobs (index) and every blob it uses.

A file that changes while it is read is read again; one that keeps changing is read while the container is paused
(the caller's pause), and, when even that gives no stable copy (a program outside the container writes it, or pause
is off), it is stored as read and named (unstable).

The stat cache (StatCache) is a file of the store's index/ folder per container: JSON lines, each the changes of one
backup, a full line when a tree was read in full. It is a cache: when it is missing, does not end with the previous
backup, or a periodic full read is due, the backup reads every file (and writes only the chunks the store lacks).

Reads the server's files, writes chunks and the listing as blobs; never a manifest, never talks to the engine.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import errno
import json
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from ansible_collections.gpulab.lab.plugins.module_utils.backup.blobs import ChunkedLayerWriter
from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import BackupError, check_name, sha256_of
from ansible_collections.gpulab.lab.plugins.module_utils.backup.overlay import _xattrs, scan
from ansible_collections.gpulab.lab.plugins.module_utils.backup.streams import BlobReader, unpack_to
from ansible_collections.gpulab.lab.plugins.module_utils.files import fsync_dir

TREE_FORMAT = "tree"
# Content chunks: large, so that a manifest of a big work directory lists few blobs (each is an entry in every
# manifest); a file changed in place costs the pieces that changed. The listing's chunks are small: it changes a
# little with every backup.
CONTENT_SIZES = {"min_size": 4 * 1024 * 1024, "max_size": 16 * 1024 * 1024, "piece": 8 * 1024 * 1024}
LISTING_SIZES = {"min_size": 32 * 1024, "max_size": 128 * 1024, "piece": 64 * 1024 * 1024}
READ_SIZE = 1024 * 1024
RESTORE_JOBS = 2  # large files a restore unpacks at once (each by its own zstd) while it writes the others
TRIES = 3  # reads of a file that changes while it is read, before it is read while the container is paused
SETTLE_NS = 50_000_000  # a file changed less than this before its read may be modified again within the same tick
FUTURE_NS = 60_000_000_000  # an mtime further ahead of the clock than this cannot be trusted


class TreeArchive(NamedTuple):
    """One tree stored: its mount entry, bytes of files read, bytes written to the store, and the warning (None when
    every file was read stable)."""

    entry: dict
    read: int
    written: int
    warning: str | None


# ---- the stat cache ------------------------------------------------------------------------------------------------


class StatCache:
    """<store>/index/<container>.jsonl: each line {"backup": id, "meta": {...}, "trees": {tree: {"full": bool, "set":
    {path: overlay.stat_tuple}, "del": [paths]}}}; a full line starts it again (the file is then rewritten)."""

    MAX_LINES = 64  # then the next backup rewrites it whole

    def __init__(self, store, container):
        self.store = store
        self.folder = os.path.join(store.path, "index")
        self.path = os.path.join(self.folder, check_name(container, "container name") + ".jsonl")
        self.trees = {}
        self.last = None
        self.meta = None
        self.lines = 0
        self._load()

    def _load(self):
        try:
            with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return
        except OSError:
            return  # a cache: unreadable is as missing
        trees, last, meta = {}, None, None
        try:
            for line in lines:
                record = json.loads(line)
                for tree, change in record["trees"].items():
                    current = {} if change.get("full") else trees.setdefault(tree, {})
                    current.update(change.get("set") or {})
                    for path in change.get("del") or []:
                        current.pop(path, None)
                    trees[tree] = current
                last, meta = record["backup"], record.get("meta")
        except (ValueError, KeyError, TypeError, AttributeError):
            return  # a torn last line (a killed run): not trusted at all
        self.trees, self.last, self.meta, self.lines = trees, last, meta, len(lines)

    def tree(self, name, previous_backup):
        """The stat tuples of a tree as the previous backup left them, or {} when the cache does not end with it."""
        if previous_backup is None or self.last != previous_backup:
            return {}
        return self.trees.get(name, {})

    def save(self, backup_id, trees, meta=None):
        """trees: {tree: (full, stats)}: append this backup's changes (or rewrite the file when a tree is read in full
        or it has grown long); meta: what the caller needs with them. Returns the bytes written."""
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        rewrite = self.lines >= self.MAX_LINES or any(full for full, _stats in trees.values())
        known = self.trees
        if rewrite:
            known = {}
            trees = {name: (True, stats) for name, (_full, stats) in trees.items()}
        change = {}
        for name, (full, stats) in trees.items():
            before = {} if full else known.get(name, {})
            change[name] = {
                "full": full,
                "set": {p: s for p, s in stats.items() if before.get(p) != s},
                "del": [p for p in before if p not in stats],
            }
        line = {"backup": backup_id, "meta": meta, "trees": change}
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode("utf-8", "surrogateescape")
        if rewrite:
            fd, tmp = self.store.tmp_file("index-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            fsync_dir(self.folder)
        else:
            with open(self.path, "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        return len(data)


# ---- the backup of a tree ------------------------------------------------------------------------------------------


class _Chunks(ChunkedLayerWriter):
    """ChunkedLayerWriter that remembers where each chunk starts in the stream, so that a file's range of the stream
    can be told as chunk ranges."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.starts = []
        self.pos = 0

    def write(self, data):
        self.pos += len(data)
        return super().write(data)

    def _chunk(self, data):
        self.starts.append(self.size)
        super()._chunk(data)

    def ranges(self, start, length):
        """[[hex digest, offset in chunk, length], ...] of a range of the stream (after finish)."""
        refs = []
        i = bisect.bisect_right(self.starts, start) - 1
        while length > 0:
            chunk_start = self.starts[i]
            chunk_end = self.starts[i + 1] if i + 1 < len(self.starts) else self.size
            offset = start - chunk_start
            take = min(length, chunk_end - start)
            refs.append([self.order[i][len("sha256:") :], offset, take])
            start += take
            length -= take
            i += 1
        return refs


def _same_read(a, b):
    return (a.st_size, a.st_mtime_ns, a.st_ctime_ns, a.st_ino) == (b.st_size, b.st_mtime_ns, b.st_ctime_ns, b.st_ino)


def _read_into(chunks, path, name, final):
    """Read one file into the chunk stream; returns (stream start, fstat before, whether fstat stayed the same,
    whether it had settled: last changed a clock tick before the read began). A file smaller than a piece is read
    whole first and goes into the stream only when it stayed the same (a copy read again leaves nothing behind); a
    larger one goes in as it is read (its own pieces: a copy read again costs its pieces that changed)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NOATIME", 0))
    try:
        before = os.fstat(fd)
        started = time.time_ns()
        small = before.st_size < CONTENT_SIZES["piece"]
        parts, left, start = [], before.st_size, None
        if not small:
            chunks.mark(name, before.st_size)
            start = chunks.pos
        while left > 0:
            data = os.read(fd, min(READ_SIZE, left))
            if not data:  # it shrank while it was read: the rest as zeros (the fstat below differs: read again)
                data = b"\0" * min(READ_SIZE, left)
            if small:
                parts.append(data)
            else:
                chunks.write(data)
            left -= len(data)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    same = _same_read(before, after)
    settled = before.st_ctime_ns < started - SETTLE_NS  # ctime: the kernel's clock, never set from user space
    if small and (final or (same and settled)):
        start = chunks.pos
        chunks.mark(name, before.st_size)
        for data in parts:
            chunks.write(data)
    return start, before, same, settled


def _record(rel, st, path):
    """The listing's record of a path, without content (refs are added once the chunks are known): what a restore
    needs, and for a file what tells it unchanged next time (ctime, inode, link count)."""
    mode = st.st_mode
    rec = {"p": rel, "m": stat.S_IMODE(mode), "u": st.st_uid, "g": st.st_gid, "mt": st.st_mtime_ns}
    if stat.S_ISREG(mode):
        rec.update(c=st.st_ctime_ns, i=st.st_ino, n=st.st_nlink)
    if stat.S_ISDIR(mode):
        rec["t"] = "d"
    elif stat.S_ISREG(mode):
        rec["t"], rec["s"] = "f", st.st_size
    elif stat.S_ISLNK(mode):
        rec["t"], rec["l"] = "l", os.fsdecode(os.readlink(path))
    elif stat.S_ISFIFO(mode):
        rec["t"] = "p"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        rec["t"], rec["dev"] = ("c" if stat.S_ISCHR(mode) else "b"), st.st_rdev
    else:
        return None  # a socket: not in a backup (tar neither)
    xattrs = _xattrs(path)
    if xattrs:
        rec["x"] = {k: v.hex() for k, v in xattrs.items()}
    return rec


def read_listing(store, entry):
    """The records of a tree entry's listing, in walk order (the root first, as "")."""
    reader = BlobReader(store.blob_path(b["digest"]) for b in entry["index"])
    try:
        data = b"".join(reader.chunks())
        reader.close()
    except BaseException:
        reader.close(check=False)
        raise
    try:
        return [json.loads(line) for line in data.decode("utf-8", "surrogateescape").splitlines()]
    except ValueError as e:
        raise BackupError(f"the listing of {entry['source']} cannot be read: {e}") from e


def archive_tree(store, entry, *, previous, level, known, full=False, pause=None, progress=None):
    """Store the tree of a bind-mount source (a folder or one file; entry: its mount entry so far). previous: the
    previous backup's entry of this source (its listing tells which files are unchanged, and their chunks) or None;
    full: read every file all the same; known: the store's blob index (updated); pause: a context manager factory
    that freezes the container (for the files that keep changing). Returns a TreeArchive."""
    old = {}
    if previous and previous.get("format") == TREE_FORMAT and not full:
        old = {r["p"]: r for r in read_listing(store, previous)}
    run = _TreeRun(store, dict(entry), known, level, progress)
    try:
        run.walk(old)
        run.read_changed(pause)
        return run.finish()
    except BaseException:
        run.chunks.abort()
        raise


def _unchanged(prev, attrs, known):
    """True when the previous listing's record of a path says it is this one, as read then: the same attributes (mode,
    owner, size, mtime, ctime, inode, link count), settled when it was read, no time in the future; a file's chunks
    in the store."""
    return (
        prev is not None
        and prev.get("a") == attrs
        and not prev.get("racy")
        and (prev["t"] != "f" or all("sha256:" + r[0] in known for r in prev.get("r") or []))
    )


class _TreeRun:
    """One tree's backup: the walk (records, the files to read), the reads, the listing and the entry."""

    def __init__(self, store, entry, known, level, progress):
        self.store = store
        self.entry = entry
        self.source = os.path.normpath(entry["source"])
        self.known = known
        self.level = level
        self.progress = progress
        self.chunks = _Chunks(store, known, level, progress, **CONTENT_SIZES)
        self.records = []
        self.todo = []
        self.read = 0
        self.unstable = []
        self.read_while_paused = []
        self.paused = False
        self.pause_used = None

    def walk(self, old):
        """Every path's record: one whose attributes (a scan: one find process) are those the previous listing
        recorded is taken from it, a file with its chunks; the others are read from their lstat, their files to be
        read. The records in the order of a sorted walk, each folder before what it holds."""
        now = time.time_ns()
        st = os.lstat(self.source)
        scanned, _targets = scan(self.source, tolerant=True) if stat.S_ISDIR(st.st_mode) else ({}, {})
        root = _record("", st, self.source)
        self.records.append(root)
        if root["t"] == "f":
            self.todo.append((root, self.source))
        links = {}
        for rel in sorted(scanned, key=lambda n: n.split("/")):
            attrs = scanned[rel]
            prev = old.get(rel)
            if _unchanged(prev, attrs, self.known):
                self.records.append(prev)
                if prev["t"] == "f" and prev.get("n", 1) > 1:
                    links.setdefault(prev["i"], rel)
                continue
            path = os.path.join(self.source, rel)
            try:
                st = os.lstat(path)
                rec = _record(rel, st, path)
            except FileNotFoundError:
                continue  # removed meanwhile
            if rec is None:
                continue
            rec["a"] = attrs
            if rec["mt"] > now + FUTURE_NS:
                rec["racy"] = True  # a time in the future: not trusted next time
            self.records.append(rec)
            if rec["t"] != "f":
                continue
            if st.st_nlink > 1:
                first = links.setdefault(st.st_ino, rel)
                if first != rel:
                    rec["t"], rec["l"] = "h", first
                    for key in ("s", "c", "i", "n"):
                        del rec[key]
                    continue
            self.todo.append((rec, path))

    def read_changed(self, pause):
        """Read the files to read; those that changed while read, again (TRIES times), then while paused."""
        for attempt in range(TRIES):
            final = attempt == TRIES - 1 and pause is None
            self.todo = [item for item in self.todo if self._read_one(*item, paused=False, final=final) is False]
            if not self.todo:
                return
            if final:
                self.unstable = [rec["p"] for rec, _path in self.todo]
                return
            time.sleep(SETTLE_NS / 1e9)
        with pause() as frozen:
            self.pause_used = frozen
            self.paused = bool(getattr(frozen, "active", False))
            read = [(rec["p"], self._read_one(rec, path, self.paused, True)) for rec, path in self.todo]
        self.read_while_paused = [name for name, stable in read if self.paused and stable is not None]
        self.unstable = [name for name, stable in read if stable is False]

    def _read_one(self, rec, path, paused, final=False):
        """Read a file into the chunks (final: even when it changed meanwhile); None when it is gone, else whether
        the copy is of one moment."""
        try:
            start, st, same, settled = _read_into(self.chunks, path, rec["p"], final or paused)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:  # replaced by a symlink meanwhile
                return None
            raise
        stable = same and (settled or paused)  # paused: nothing in the container writes it
        rec.update(s=st.st_size, mt=st.st_mtime_ns, c=st.st_ctime_ns, i=st.st_ino, n=st.st_nlink)
        rec["_range"] = (start, st.st_size)
        rec.pop("racy", None)
        if not stable or max(st.st_mtime_ns, st.st_ctime_ns) > time.time_ns() + FUTURE_NS:
            rec["racy"] = True  # not trusted next time (changed while read, or a time in the future): read again
        self.read += st.st_size
        return stable

    def finish(self):
        blobs, written = self.chunks.finish()
        content = {b["digest"]: b for b in blobs}
        for rec in self.records:
            if "_range" in rec:
                start, length = rec.pop("_range")
                rec["r"] = self.chunks.ranges(start, length) if length else []
            for ref in rec.get("r") or []:
                digest = "sha256:" + ref[0]
                if digest not in content:
                    content[digest] = dict(self.known[digest])
        index, listing_written = _store_listing(self.store, self.records, self.level, self.known, self.progress)
        written += listing_written
        blobs = {b["digest"]: dict(b) for b in index}
        blobs.update((d, dict(b)) for d, b in content.items() if d not in blobs)
        self.entry.update(
            format=TREE_FORMAT,
            size=sum(rec.get("s", 0) for rec in self.records),
            files=sum(1 for rec in self.records if rec["t"] in "fh"),
            index=index,
            blobs=list(blobs.values()),
            signature=sha256_of("".join(b["digest"] for b in index).encode()),
            reused=self.read == 0 and written == 0,
            unstable=self.unstable,
            read_while_paused=self.read_while_paused,
        )
        warning = None
        if self.unstable:
            failed = getattr(self.pause_used, "failed", None)
            how = (
                "even while the container was paused"
                if self.paused
                else f"and the container could not be paused ({failed})"
                if failed
                else "and the container was not paused"
            )
            names = ", ".join(os.path.join(self.source, p) if p else self.source for p in self.unstable)
            warning = (
                f"{len(self.unstable)} file(s) of {self.source} kept changing while they were read, {how}: stored as "
                f"read, they may hold parts of several versions: {names}"
            )
        return TreeArchive(self.entry, self.read, written, warning)


def _store_listing(store, records, level, known, progress):
    """The listing as small chunks (one record a line); returns (its blob entries, bytes written)."""
    writer = ChunkedLayerWriter(store, known, level, progress, **LISTING_SIZES)
    try:
        for rec in records:
            line = (json.dumps(rec, separators=(",", ":"), ensure_ascii=False) + "\n").encode(
                "utf-8", "surrogateescape"
            )
            writer.mark(rec["p"], len(line))
            writer.write(line)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


# ---- the restore of a tree -----------------------------------------------------------------------------------------


def tree_kinds(store, entry):
    """{absolute path: directory, symlink or file} of a tree entry (its listing)."""
    source = os.path.normpath(entry["source"])
    kinds = {}
    for rec in read_listing(store, entry):
        rel = rec["p"]
        if rel.startswith("/") or ".." in rel.split("/"):
            raise BackupError(f"the listing of {source} holds {rel!r}, which is outside it")
        path = os.path.join(source, rel) if rel else source
        kinds[path] = {"d": "directory", "l": "symlink"}.get(rec["t"], "file")
    return kinds


class _Content:
    """The content of a listing's files. A large file whose chunks are its own (each whole and used once: its
    pieces) is unpacked by a zstd of its own that writes the file directly (no pipe, no copy through Python), in the
    background (RESTORE_JOBS at once) while the other files are written; the other files' chunks are read once, in the
    order the files need them (one zstd stream), a chunk several files share kept until its last range is taken."""

    def __init__(self, store, records, sizes):
        self.store = store
        self.sizes = sizes
        uses = {}
        for rec in records:
            for ref in rec.get("r") or []:
                uses[ref[0]] = uses.get(ref[0], 0) + 1
        self.uses = uses
        self.direct = set()
        order = {}
        for rec in records:
            refs = rec.get("r") or []
            if refs and rec.get("s", 0) >= CONTENT_SIZES["piece"] and all(self._own(ref) for ref in refs):
                self.direct.add(rec["p"])
                continue
            for ref in refs:
                order.setdefault(ref[0], None)
        self.order = list(order)
        self.reader = BlobReader(store.blob_path("sha256:" + d) for d in self.order) if self.order else None
        self.next = 0
        self.held = {}
        self.pool = ThreadPoolExecutor(RESTORE_JOBS) if self.direct else None
        self.jobs = collections.deque()  # (future, fd, path, record) of the files being unpacked, oldest first

    def _own(self, ref):
        digest, offset, length = ref
        return offset == 0 and self.sizes.get(digest) == length and self.uses[digest] == 1

    def _load(self, digest):
        while digest not in self.held:
            name = self.order[self.next]
            self.next += 1
            buf = bytearray(self.sizes[name])
            if self.reader.readinto(memoryview(buf)) != len(buf):
                raise BackupError(f"chunk sha256:{name} ends early")
            self.held[name] = buf
        return self.held[digest]

    def write(self, fd, path, rec):
        """Write a file's content to fd, opened for it, and its metadata; fd is closed here, now or, for a file
        unpacked in the background, once it is written (wait())."""
        if rec["p"] in self.direct:
            try:
                while len(self.jobs) >= 2 * RESTORE_JOBS:  # a bounded number of open files
                    self._finish_one()
                paths = [self.store.blob_path("sha256:" + ref[0]) for ref in rec["r"]]
                self.jobs.append((self.pool.submit(unpack_to, fd, paths), fd, path, rec))
            except BaseException:
                os.close(fd)
                raise
            return
        try:
            for ref in rec.get("r") or []:
                self._write_range(fd, ref)
            _meta(path, rec, fd)
        finally:
            os.close(fd)

    def _write_range(self, fd, ref):
        digest, offset, length = ref
        if self._own(ref) and digest not in self.held and self.order[self.next] == digest:  # one file's: straight in
            self.next += 1
            self.uses[digest] = 0
            if self.reader.copy_to(fd, length) != length:
                raise BackupError(f"chunk sha256:{digest} ends early")
            return
        data = self._load(digest)
        view = memoryview(data)[offset : offset + length]
        while view:
            view = view[os.write(fd, view) :]
        self.uses[digest] -= 1
        if not self.uses[digest]:
            del self.held[digest]

    def _finish_one(self):
        future, fd, path, rec = self.jobs.popleft()
        try:
            future.result()
            size, expected = os.fstat(fd).st_size, sum(ref[2] for ref in rec["r"])
            if size != expected:
                raise BackupError(f"the chunks of {path} hold {size} bytes, not {expected}")
            _meta(path, rec, fd)
        finally:
            os.close(fd)

    def wait(self):
        """Every file unpacked in the background written, with its metadata."""
        while self.jobs:
            self._finish_one()

    def close(self, check=True):
        if self.pool:
            for future, _fd, _path, _rec in self.jobs:
                future.cancel()  # not started yet: never will
            self.pool.shutdown(wait=True)
            for _future, fd, _path, _rec in self.jobs:
                os.close(fd)
            self.jobs.clear()
        if self.reader:
            self.reader.close(check=check)


def _remove(path):
    """Whatever non-folder is at path goes (a restore replaces files: never writes through a link)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _meta(path, rec, fd=None):
    if fd is not None:
        os.fchown(fd, rec["u"], rec["g"])
        os.fchmod(fd, rec["m"])
    else:
        os.chown(path, rec["u"], rec["g"], follow_symlinks=False)
        if rec["t"] != "l":
            os.chmod(path, rec["m"])
    for name, value in (rec.get("x") or {}).items():
        with contextlib.suppress(OSError):
            if fd is not None:
                os.setxattr(fd, name, bytes.fromhex(value))
            else:
                os.setxattr(path, name, bytes.fromhex(value), follow_symlinks=False)
    times = (rec["mt"], rec["mt"])
    if fd is not None:
        os.utime(fd, ns=times)
    else:
        os.utime(path, ns=times, follow_symlinks=False)


def restore_tree(store, entry):
    """Write a tree entry's files where they were: folders made or kept, every other path replaced; owners, modes,
    xattrs and mtimes as recorded (folders' last, deepest first). What the backup lacks was moved aside before."""
    source = os.path.normpath(entry["source"])
    records = read_listing(store, entry)
    content = _Content(store, records, {b["digest"][len("sha256:") :]: b["size"] for b in entry["blobs"]})
    folders = []
    made = set()  # folders made here: empty, nothing in them to replace
    ok = False
    try:
        for rec in records:
            path = os.path.join(source, rec["p"]) if rec["p"] else source
            kind = rec["t"]
            fresh = os.path.dirname(path) in made
            if kind == "d":
                if fresh or not os.path.isdir(path) or os.path.islink(path):
                    if not fresh:
                        _remove(path)
                    os.mkdir(path, 0o700)
                    made.add(path)
                folders.append((path, rec))
                continue
            if not fresh:
                _remove(path)
            if kind == "f":
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                content.write(fd, path, rec)
            elif kind == "h":
                os.link(os.path.join(source, rec["l"]), path)
            elif kind == "l":
                os.symlink(rec["l"], path)
                _meta(path, rec)
            else:
                kind_bits = {"p": stat.S_IFIFO, "c": stat.S_IFCHR, "b": stat.S_IFBLK}[kind]
                os.mknod(path, kind_bits | rec["m"], rec.get("dev", 0))
                _meta(path, rec)
        content.wait()
        for path, rec in reversed(folders):
            _meta(path, rec)
        ok = True
    finally:
        content.close(check=ok)
