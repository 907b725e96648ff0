# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""A container's overlay2 writable layer as an OCI/Docker layer tar, and a content-defined chunker (issue 7).

Building blocks for the fast backup path; nothing here talks to Docker or to the store.

write_layer(upperdir, out) walks an overlayfs upper directory (`docker inspect`: GraphDriver.Data.UpperDir) and
streams a POSIX (PAX) tar to `out`, converting it the way Docker's overlay2 driver does when it computes a diff
(moby pkg/archive, overlayWhiteoutConverter):
  - a character device 0:0 is a whiteout: it becomes an empty regular file `.wh.<name>` (mode 0600, its owner and
    mtime kept) in the same directory;
  - a directory with the xattr trusted.overlay.opaque = "y" gets, after its own entry, an empty regular file
    `<dir>/.wh..wh..opq` (the directory's permission bits and owner);
  - every other entry keeps its type, mode (setuid, setgid, sticky included), numeric uid/gid (uname and gname
    empty, as Docker's own layers), mtime (whole seconds, as Docker truncates them), symlink target and device numbers;
  - a second path to an inode already written (nlink > 1) becomes a hard link entry to the first path;
  - extended attributes other than trusted.overlay.* go as PAX records SCHILY.xattr.<name> (values byte for byte);
  - sockets cannot be in a tar: skipped and counted, as Docker skips them;
  - names are relative, without a leading "./" (`etc/passwd`); directories end in "/" (`etc/`), as in the layer tars
    of `docker save` and Python's tarfile when it writes; the upper directory itself has no entry (Docker neither).
  - order: names sorted by their bytes, each directory's entry before its contents: the same tree gives the same tar.
Files are copied in 1 MiB chunks, never whole in memory; holes of sparse files come out as zeros (the tar is not
GNU-sparse, which `docker load` would not read back as holes anyway). Non-ASCII and non-UTF-8 names go through as PAX
path records (bytes preserved with surrogateescape).
An upper directory the conversion cannot represent faithfully raises UnsupportedOverlay, so that the caller falls
back to `docker commit` + `docker save`: overlay's metacopy (file data still in a lower layer) or redirect_dir
(renamed directories) features, which Docker's overlay2 driver never turns on but a hand-tuned engine might.

chunks(stream, min_size, avg_size, max_size) cuts a byte stream into content-defined chunks (FastCDC: a gear hash,
cut-point skipping below min_size, normalized chunking), so that an insertion or deletion moves only the boundaries
near it, and a layer written again after a small change shares almost all its chunks with the previous one.
It uses the pyfastcdc package (Cython FastCDC 2020, a port of nlfiedler/fastcdc-rs, MIT) when its compiled extension
imports, else a pure-Python FastCDC here (about 5-7 MB/s on this host: correct, but slow for a layer of gigabytes).
The two place their boundaries differently (different gear tables): chunks are named by their content hash, so
mixing them is always correct, only the deduplication between a backup made with one and the next made with the other
is lost. CHUNKER says which one is in use.

Python's standard library only (3.8 or newer).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tarfile

COPY_SIZE = 1024 * 1024
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_XATTR_PREFIX = "trusted.overlay."
OPAQUE_XATTR = "trusted.overlay.opaque"
# overlayfs features whose upper directory is not a plain diff of the lower layers.
UNSUPPORTED_XATTRS = ("trusted.overlay.metacopy", "trusted.overlay.redirect")

DEFAULT_MIN_SIZE = 256 * 1024
DEFAULT_AVG_SIZE = 1024 * 1024
DEFAULT_MAX_SIZE = 4 * 1024 * 1024


class UnsupportedOverlay(Exception):
    """The upper directory uses an overlayfs feature a layer tar cannot represent: use the commit + save path."""


class _CountingWriter:
    """Counts and hashes (sha256: the layer's diff_id) what goes to the file object `out`."""

    def __init__(self, out):
        self.out = out
        self.size = 0
        self.digest = hashlib.sha256()

    def write(self, data):
        self.out.write(data)
        self.size += len(data)
        self.digest.update(data)
        return len(data)

    def flush(self):
        flush = getattr(self.out, "flush", None)
        if flush is not None:
            flush()


def _xattrs(path):
    """The xattrs of path, not following a symlink: {name: bytes}. Empty where the filesystem has none."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            return {}
        raise
    values = {}
    for name in sorted(names):
        try:
            values[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                continue  # removed meanwhile, or a name listed but not readable here
            raise
    return values


def _is_whiteout(st):
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _base_info(name, st):
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid = st.st_uid
    info.gid = st.st_gid
    info.uname = ""
    info.gname = ""
    info.mtime = int(st.st_mtime)  # whole seconds, as Docker's layers
    info.type = tarfile.REGTYPE
    info.size = 0
    return info


def _walk(top):
    """(relative path, absolute path, lstat), bytes paths, of everything below top: names sorted by their bytes, each
    directory followed at once by its contents (as Go's filepath.Walk). An explicit stack: no recursion limit."""
    stack = [(b"", iter(sorted(os.listdir(top))))]
    while stack:
        rel_dir, names = stack[-1]
        name = next(names, None)
        if name is None:
            stack.pop()
            continue
        rel = rel_dir + b"/" + name if rel_dir else name
        path = os.path.join(top, rel)
        st = os.lstat(path)
        yield rel, path, st
        if stat.S_ISDIR(st.st_mode):
            stack.append((rel, iter(sorted(os.listdir(path)))))


STAT_KEYS = (
    "entries",
    "bytes",
    "files",
    "dirs",
    "symlinks",
    "hardlinks",
    "devices",
    "whiteouts",
    "opaque_dirs",
    "xattrs",
    "skipped_sockets",
)


def write_layer(upperdir, out, progress=None):
    """Write the overlay upper directory `upperdir` as a layer tar (PAX) to the binary file object `out`.

    `out` needs only write(); it is neither seeked nor closed. `progress`, if given, is called with the stats dict
    after each entry. Returns the stats: entries (tar members), bytes (file content written), tar_bytes (size of the
    tar), diff_id ("sha256:<hex>" of the tar), files, dirs, symlinks, hardlinks, devices, whiteouts, opaque_dirs,
    xattrs, skipped_sockets. Raises UnsupportedOverlay (see the module's doc) and OSError.
    """
    top = os.fsencode(upperdir)
    if not os.path.isdir(top):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", upperdir)
    stats = dict.fromkeys(STAT_KEYS, 0)
    writer = _CountingWriter(out)
    seen = {}  # (st_dev, st_ino) -> first name, for inodes with more than one link
    with tarfile.open(
        fileobj=writer,
        mode="w|",
        format=tarfile.PAX_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
        copybufsize=COPY_SIZE,
    ) as tar:  # closing writes the end-of-archive blocks; `out` stays open
        for rel, path, st in _walk(top):
            for info, source in _entries(os.fsdecode(rel), path, st, seen, stats):
                if source is None:
                    tar.addfile(info)
                else:
                    _add_file(tar, info, source)
                stats["entries"] += 1
                if progress is not None:
                    progress(stats)
    writer.flush()
    stats["tar_bytes"] = writer.size
    stats["diff_id"] = "sha256:" + writer.digest.hexdigest()
    return stats


def _add_file(tar, info, path):
    with open(path, "rb", buffering=0) as f:
        try:
            tar.addfile(info, f)  # copies info.size bytes in COPY_SIZE pieces
        except OSError as e:
            if "unexpected end of data" in str(e):
                raise OSError(f"{info.name} shrank while it was read: is the container paused?") from e
            raise


def _entries(name, path, st, seen, stats):
    """The tar members for one path of the upper directory: (TarInfo, path of the content to copy or None)."""
    mode = st.st_mode
    if stat.S_ISSOCK(mode):
        stats["skipped_sockets"] += 1
        return []
    if _is_whiteout(st):
        head, tail = os.path.split(name)
        info = _base_info(os.path.join(head, WHITEOUT_PREFIX + tail), st)
        info.mode = 0o600
        stats["whiteouts"] += 1
        return [(info, None)]
    xattrs = _checked_xattrs(name, path, st)
    info = _base_info(name, st)
    _add_xattrs(info, xattrs, stats)
    inode = (st.st_dev, st.st_ino)
    if not stat.S_ISDIR(mode) and st.st_nlink > 1:
        if inode in seen:
            info.type = tarfile.LNKTYPE
            info.linkname = seen[inode]
            stats["hardlinks"] += 1
            return [(info, None)]
        seen[inode] = name
    if stat.S_ISREG(mode):
        info.size = st.st_size
        stats["files"] += 1
        stats["bytes"] += st.st_size
        return [(info, path)]
    if stat.S_ISDIR(mode):
        info.type = tarfile.DIRTYPE
        stats["dirs"] += 1
        members = [(info, None)]
        if xattrs.get(OPAQUE_XATTR) == b"y":  # after the directory, as Docker: its permission bits, owner, mtime
            marker = _base_info(name + "/" + OPAQUE_MARKER, st)
            marker.mode = stat.S_IMODE(mode) & 0o777
            members.append((marker, None))
            stats["opaque_dirs"] += 1
        return members
    _special(info, path, st, stats)
    return [(info, None)]


def _checked_xattrs(name, path, st):
    xattrs = _xattrs(path)
    for key in UNSUPPORTED_XATTRS:
        if key in xattrs:
            raise UnsupportedOverlay(f"{name}: has {key}: overlay's metacopy or redirect_dir is in use")
    if stat.S_ISREG(st.st_mode) and "trusted.overlay.whiteout" in xattrs:
        # An xwhiteout (Linux 6.7+): a whiteout kept as a regular file. Docker never makes them in an upper.
        raise UnsupportedOverlay(f"{name}: an overlay xwhiteout")
    return xattrs


def _add_xattrs(info, xattrs, stats):
    """SCHILY.xattr.<name> PAX records, values byte for byte (tarfile writes them back with surrogateescape)."""
    for key, value in xattrs.items():
        if not key.startswith(OVERLAY_XATTR_PREFIX):
            info.pax_headers["SCHILY.xattr." + key] = value.decode("utf-8", "surrogateescape")
            stats["xattrs"] += 1


def _special(info, path, st, stats):
    """Symlinks, device nodes and fifos."""
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        info.type = tarfile.SYMTYPE
        info.linkname = os.fsdecode(os.readlink(path))
        stats["symlinks"] += 1
        return
    if stat.S_ISFIFO(mode):
        info.type = tarfile.FIFOTYPE
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
        info.devmajor = os.major(st.st_rdev)
        info.devminor = os.minor(st.st_rdev)
    else:
        raise UnsupportedOverlay(f"{info.name}: unknown file type {oct(stat.S_IFMT(mode))}")
    stats["devices"] += 1


# ---- content-defined chunks ----------------------------------------------------------------------------------------


def _gear_table():
    # Fixed forever: changing it moves every boundary and loses the deduplication against older backups.
    return tuple(int.from_bytes(hashlib.sha256(b"gpulab gear %d" % i).digest()[:8], "big") for i in range(256))


_GEAR = _gear_table()
_MASK64 = (1 << 64) - 1

try:  # its compiled extension only: pyfastcdc's pure-Python fallback would bring nothing over the one here
    from pyfastcdc.cy import FastCDC as _PyFastCDC  # type: ignore[import-not-found]

    CHUNKER = "pyfastcdc"
except ImportError:  # pragma: no cover - depends on the machine
    _PyFastCDC = None
    CHUNKER = "python"


def _masks(avg_size):
    """FastCDC's normalized chunking (level 1): a harder mask below avg_size, an easier one above it.

    The gear hash shifts left, so its high bits depend on the last 64 bytes: the masks take the top bits.
    """
    bits = max(avg_size.bit_length() - 1, 2)
    hard = ((1 << (bits + 1)) - 1) << (64 - (bits + 1))
    easy = ((1 << (bits - 1)) - 1) << (64 - (bits - 1))
    return hard, easy


def _cut(buf, start, end, sizes, masks):
    """Length of the chunk starting at buf[start], with buf[start:end] available (end - start >= max_size or EOF)."""
    min_size, avg_size, max_size = sizes
    hard, easy = masks
    gear = _GEAR
    remaining = end - start
    if remaining <= min_size:
        return remaining
    remaining = min(remaining, max_size)
    center = min(avg_size, remaining)
    h = 0
    i = start + min_size
    stop = start + center
    while i < stop:
        h = ((h << 1) + gear[buf[i]]) & _MASK64
        if not h & hard:
            return i - start + 1
        i += 1
    stop = start + remaining
    while i < stop:
        h = ((h << 1) + gear[buf[i]]) & _MASK64
        if not h & easy:
            return i - start + 1
        i += 1
    return remaining


def _check_sizes(min_size, avg_size, max_size):
    if not 64 <= min_size <= avg_size <= max_size:
        raise ValueError(f"chunk sizes must be 64 <= min <= avg <= max, not {min_size}/{avg_size}/{max_size}")


def chunks(stream, min_size=DEFAULT_MIN_SIZE, avg_size=DEFAULT_AVG_SIZE, max_size=DEFAULT_MAX_SIZE, use=None):
    """Yield the content-defined chunks (bytes) of the binary stream `stream` (anything with read(n)).

    Every chunk is min_size..max_size bytes long except the last one, which may be shorter; the chunks joined are the
    stream. Memory: a few times max_size. `use`: "pyfastcdc" or "python" to force an implementation (tests);
    default CHUNKER.
    """
    _check_sizes(min_size, avg_size, max_size)
    use = use or CHUNKER
    if use == "pyfastcdc":
        if _PyFastCDC is None:
            raise RuntimeError("pyfastcdc's compiled extension is not importable here")
        cdc = _PyFastCDC(avg_size, min_size=min_size, max_size=max_size)
        for chunk in cdc.cut_stream(stream):
            yield bytes(chunk.data)
        return
    if use != "python":
        raise ValueError(f"unknown chunker {use!r}")
    sizes = (min_size, avg_size, max_size)
    masks = _masks(avg_size)
    buf = bytearray()
    pos = 0
    eof = False
    read_size = max(max_size * 2, COPY_SIZE)
    while True:
        if not eof and len(buf) - pos < max_size:
            del buf[:pos]
            pos = 0
            while not eof and len(buf) < read_size:
                data = stream.read(read_size - len(buf))
                if not data:
                    eof = True
                else:
                    buf += data
        if pos >= len(buf):
            return
        length = _cut(buf, pos, len(buf), sizes, masks)
        yield bytes(buf[pos : pos + length])
        pos += length
