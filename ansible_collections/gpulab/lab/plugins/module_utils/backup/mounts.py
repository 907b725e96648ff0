# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""Bind-mounted folders and files of a container: which are archived (not system paths, sockets or volumes), their
archive as a blob (not again while unchanged), and their restore where they were, with owners and modes, exactly as
the backup has them: what the backup lacks is moved aside to a folder beside the source (never deleted).

Reads and writes the server's files and the store's blobs; never talks to the engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
from typing import NamedTuple

from ansible_collections.gpulab.lab.plugins.module_utils.backup.blobs import BlobWriter
from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import CHUNK, BackupError
from ansible_collections.gpulab.lab.plugins.module_utils.backup.streams import (
    TAR_EXTRACT,
    BlobReader,
    TarOf,
    tar_program,
)
from ansible_collections.gpulab.lab.plugins.module_utils.files import fsync_dir

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


class Restored(NamedTuple):
    """One bind-mount source restored: its path, the folder what the backup did not have was moved to (None when
    nothing was), and the paths moved there (relative to the source)."""

    source: str
    moved_to: str | None
    moved: list


def _kind(mode):
    return "directory" if stat.S_ISDIR(mode) else "symlink" if stat.S_ISLNK(mode) else "file"


def archive_kinds(store, entry):
    """{absolute path: directory, symlink or file} of every member of a bind-mount archive, read from its blobs (a
    full pass of zstd and tar's headers, before anything changes). A member outside the source is refused."""
    source = os.path.normpath(entry["source"])
    reader = BlobReader(store.blob_path(b["digest"]) for b in entry["blobs"])
    kinds = {}
    try:
        with tarfile.open(fileobj=reader, mode="r|", bufsize=CHUNK) as tar:
            while True:
                member = tar.next()
                if member is None:
                    break
                tar.members.clear()  # stream mode keeps every header otherwise: a big work directory's worth
                path = os.path.normpath("/" + member.name)
                if not under(path, source):
                    raise BackupError(f"the archive of {source} holds {path}, which is outside it")
                kinds[path] = "directory" if member.isdir() else "symlink" if member.issym() else "file"
        reader.close()
    except (tarfile.TarError, OSError) as e:
        reader.close(check=False)
        raise BackupError(f"the archive of {source} cannot be read: {e}") from e
    except BaseException:
        reader.close(check=False)
        raise
    return kinds


def move_aside(source, kinds, stamp):
    """Move what is under source and not in the backup (or of another kind there: a folder where the backup has a
    file, a symlink where it has a folder) to <source>.gpulab-moved-<stamp>/, same owner as source, mode 0700, keeping
    the paths. Kept, not deleted: it is the user's newer work. Returns (that folder or None, relative paths moved)."""
    extras = []

    def visit(path):
        st = os.lstat(path)
        if kinds.get(path) != _kind(st.st_mode):
            extras.append((path, st))
        elif stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(path)):
                visit(os.path.join(path, name))

    if not os.path.lexists(source):
        return None, []
    visit(source)
    if not extras:
        return None, []
    owner = os.lstat(source)
    folder, n = f"{source}.gpulab-moved-{stamp}", 1
    while os.path.lexists(folder):
        n += 1
        folder = f"{source}.gpulab-moved-{stamp}-{n}"
    moved = []
    for path, _st in extras:
        rel = os.path.basename(source) if path == source else os.path.relpath(path, source)
        dest = os.path.join(folder, rel)
        parts = [p for p in os.path.dirname(rel).split(os.sep) if p]
        for depth in range(len(parts) + 1):
            parent = os.path.join(folder, *parts[:depth])
            if not os.path.isdir(parent):
                os.mkdir(parent, 0o700)
                os.chown(parent, owner.st_uid, owner.st_gid)
                os.chmod(parent, 0o700)
        shutil.move(path, dest)  # a rename: the folder is beside source, on its file system
        moved.append(rel)
    fsync_dir(os.path.dirname(folder))
    return folder, moved


def restore_mount(store, entry, kinds=None, stamp=None):
    """Put a bind-mount source back as the backup has it, with its owners, modes and extended attributes: what the
    backup lacks is moved aside first (move_aside), files in both are replaced by the backup's. kinds: what
    archive_kinds() gave (read here when None). Returns Restored."""
    source = entry["source"]
    why = system_path_reason(source) if os.path.isabs(source) else "not an absolute path"
    if why:
        raise BackupError(f"the backup's archive of {source} is not restored: {why}")
    source = os.path.normpath(source)
    kinds = archive_kinds(store, entry) if kinds is None else kinds
    folder, moved = move_aside(source, kinds, stamp or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
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
    return Restored(source, folder, moved)


# ---- backup --------------------------------------------------------------------------------------------------------
