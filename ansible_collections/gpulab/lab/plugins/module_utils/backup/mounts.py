# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""Bind-mounted folders and files of a container: which are archived (not system paths, sockets or volumes), their
archive as a blob (not again while unchanged), and their unpacking where they were, with owners and modes.

Reads and writes the server's files and the store's blobs; never talks to the engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import stat
import subprocess
import tempfile
from typing import NamedTuple

from ansible_collections.gpulab.lab.plugins.module_utils.backup.blobs import BlobWriter
from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import BackupError
from ansible_collections.gpulab.lab.plugins.module_utils.backup.streams import (
    TAR_EXTRACT,
    BlobReader,
    TarOf,
    tar_program,
)

# Bind-mount sources that are not a user's files: never archived, never written back.
SYSTEM_TREES = (
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/var/run",
    "/var/lib/docker",
    "/var/lib/containerd",
    "/boot",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
)
TOP_LEVEL = ("/", "/etc", "/home", "/root", "/var", "/srv", "/opt", "/tmp", "/mnt", "/media")  # noqa: S108 (paths refused)


class MountArchive(NamedTuple):
    """One bind-mount source archived: its manifest entry, bytes read, bytes written to the store, tar's warning."""

    entry: dict
    read: int
    written: int
    warning: str


def under(path, tree):
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def system_path_reason(path):
    """Why a bind-mount source is a system path gpulab does not archive, or None."""
    real = os.path.realpath(path)
    for candidate in dict.fromkeys((path, real)):
        if candidate in TOP_LEVEL:
            return f"{candidate} is a top-level system folder"
        for tree in SYSTEM_TREES:
            if under(candidate, tree):
                return f"{candidate} is under {tree}, a system path"
        if posixpath.dirname(candidate) == "/etc" and not os.path.isdir(candidate):
            return f"{candidate} is a system file of /etc"
    return None


def plan_mounts(info):
    """(bind mounts to archive, mounts skipped with the reason) of a container."""
    archive, skipped = [], []
    for mount in info.get("Mounts") or []:
        kind, source, target = mount.get("Type"), mount.get("Source") or "", mount.get("Destination")
        entry = {"source": source or mount.get("Name"), "destination": target, "type": kind}
        why = None
        if kind != "bind":
            why = f"a {kind} mount: only bind mounts are archived"
        elif not os.path.isabs(source):
            why = "not an absolute path on the server"
        else:
            why = system_path_reason(source)
        if why is None:
            try:
                st = os.stat(source)
            except OSError as e:
                st, why = None, f"cannot be read on the server ({e.strerror})"
            if st is not None and not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                why = "neither a folder nor a file (a socket or device)"
        if why:
            skipped.append({**entry, "why": why})
        else:
            archive.append(
                {
                    "source": os.path.normpath(source),
                    "destination": target,
                    "read_only": not mount.get("RW", True),
                    "kind": "directory" if os.path.isdir(source) else "file",
                }
            )
    return archive, skipped


def tree_signature(path):
    """A digest of the stat data of every entry under path: it changes with any change of content or metadata (ctime),
    so an unchanged folder is not archived again."""
    digest = hashlib.sha256()

    def add(p):
        st = os.lstat(p)
        rel = os.path.relpath(p, path)
        fields = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        digest.update(f"{rel}\0{fields}\n".encode("utf-8", "surrogateescape"))

    add(path)
    if os.path.isdir(path) and not os.path.islink(path):
        for folder, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(dirs + files):
                with contextlib.suppress(FileNotFoundError):
                    add(os.path.join(folder, name))
    return "sha256:" + digest.hexdigest()


def parents_of(path):
    """Owner and mode of the folders above path (created as they were, when a restore finds them missing)."""
    out = []
    parent = os.path.dirname(path)
    while parent not in ("/", ""):
        st = os.stat(parent)
        out.append({"path": parent, "uid": st.st_uid, "gid": st.st_gid, "mode": stat.S_IMODE(st.st_mode)})
        parent = os.path.dirname(parent)
    return list(reversed(out))


def archive_mount(store, mount, previous, level, *, known=None, progress=None):
    """Store the archive of one bind-mount source as a blob (not again when its stat signature is that of the
    previous backup's archive; known: the store's blob index). Returns a MountArchive."""
    known = {} if known is None else known
    source = mount["source"]
    st = os.stat(source)
    entry = dict(mount, uid=st.st_uid, gid=st.st_gid, mode=stat.S_IMODE(st.st_mode), parents=parents_of(source))
    entry["signature"] = tree_signature(source)
    before = previous.get(source)
    if before and before.get("signature") == entry["signature"] and not store.missing_blobs({"mounts": [before]}):
        entry.update(size=before["size"], blobs=before["blobs"], reused=True)
        return MountArchive(entry, 0, 0, None)
    tar = TarOf(source)
    try:
        with BlobWriter(store, level) as writer:
            for block in tar.chunks():
                writer.write(block)
                if progress:
                    progress.update(mount=source, mount_bytes=writer.size)
            warning = tar.close()
            tar = None
            blob = writer.finish()
            kept, written = store.keep(writer, blob, known)
    finally:
        if tar is not None:
            with contextlib.suppress(BackupError, OSError):
                tar.close()
    entry.update(size=blob["size"], blobs=[kept], reused=False)
    return MountArchive(entry, blob["size"], written, warning)


def restore_mount(store, entry):
    """Unpack a bind-mount source where it was, with its owners, modes and extended attributes; returns the path."""
    source = entry["source"]
    why = system_path_reason(source) if os.path.isabs(source) else "not an absolute path"
    if why:
        raise BackupError(f"the backup's archive of {source} is not restored: {why}")
    for parent in entry.get("parents") or []:
        if not os.path.isdir(parent["path"]):
            os.mkdir(parent["path"], parent["mode"])
            os.chown(parent["path"], parent["uid"], parent["gid"])
            os.chmod(parent["path"], parent["mode"])
    reader = BlobReader(store.blob_path(b["digest"]) for b in entry["blobs"])
    with tempfile.TemporaryFile() as err:
        tar = subprocess.Popen([tar_program(), *TAR_EXTRACT, "--", source.lstrip("/")], stdin=reader.pipe(), stderr=err)
        reader.proc.stdout.close()  # tar reads zstd's output directly
        rc = tar.wait()
        err.seek(0)
        message = err.read().decode(errors="replace").strip()[-1000:]
    try:
        reader.close(check=rc == 0)  # zstd's own error, with its message, when tar was content
    except BackupError as e:
        raise BackupError(f"unpacking the archive of {source} failed: {e}") from e
    if rc != 0:
        raise BackupError(f"unpacking the archive of {source} failed: {message or f'tar {rc}'}")
    return source


# ---- backup --------------------------------------------------------------------------------------------------------
