# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""Small helpers for files and programs, one copy for gpulab's modules and module_utils (the backup package,
docker_image_archive): where a program is, a file's sha256, making a rename or a whole filesystem durable, pipe sizes.

Owns no format and no policy: nothing here knows about the store, archives or Docker. Standard library only (the
backup timer runs it on the server's python3).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil

CHUNK = 1024 * 1024


def find_program(name):
    """The path of a program (PATH, then the usual system folders), or None; callers say why they need it."""
    return shutil.which(name) or shutil.which(name, path="/usr/bin:/bin:/usr/local/bin")


def grow_pipe(fd):
    """1 MiB pipe buffers instead of 64 KiB: fewer context switches between Python and zstd (Linux only)."""
    with contextlib.suppress(OSError, AttributeError, ValueError):
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), CHUNK)


def write_all(fileobj, data):
    view = memoryview(data)
    while view:
        written = fileobj.write(view)
        if written is None:  # a non-blocking pipe that is full; ours block, so this does not happen
            continue
        view = view[written:]


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_filesystem(path):
    """Make what was written to the filesystem holding path durable: syncfs(2) (one call for many files), else
    sync(2)."""
    import ctypes  # noqa: PLC0415 (only here: a store that never writes chunks never needs it)

    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):  # no syncfs in this C library
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:  # a write-back error (EIO): the chunks are not safely on disk
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs of {path} failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def file_sha256(path, progress=None):
    """ "sha256:<hex>" of a file, read in chunks; progress("checksum", bytes done) after each chunk when given."""
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
            done += len(block)
            if progress:
                progress("checksum", done)
    return "sha256:" + digest.hexdigest()
