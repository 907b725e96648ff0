# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""Bind-mounted folders and files of a container: which are archived (not system paths, sockets or volumes), their
backup as a tree of chunks read incrementally (tree.py), and their restore where they were, with owners and modes,
exactly as the backup has them: what the backup lacks is moved aside to a folder beside the source (never deleted).
Backups older than the tree format hold a tar archive of the source: those are still restored (tar).

Reads and writes the server's files and the store's blobs; never talks to the engine.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
from typing import NamedTuple

from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import CHUNK, BackupError
from ansible_collections.gpulab.lab.plugins.module_utils.backup.streams import (
    TAR_EXTRACT,
    BlobReader,
    tar_program,
)
from ansible_collections.gpulab.lab.plugins.module_utils.backup.tree import (
    TREE_FORMAT,
    archive_tree,
    restore_tree,
    tree_kinds,
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


def parents_of(path):
    """Owner and mode of the folders above path (created as they were, when a restore finds them missing)."""
    out = []
    parent = os.path.dirname(path)
    while parent not in ("/", ""):
        st = os.stat(parent)
        out.append({"path": parent, "uid": st.st_uid, "gid": st.st_gid, "mode": stat.S_IMODE(st.st_mode)})
        parent = os.path.dirname(parent)
    return list(reversed(out))


def archive_mount(store, mount, previous, level, *, known=None, progress=None, pause=None, full_read_days=0):
    """Store one bind-mount source as a tree of content-defined chunks with its listing (tree.py): only the files
    that are new or changed since the previous backup's entry of that source are read (previous: {source: entry}),
    every file when the last full read is full_read_days old (0: never). known: the store's blob index; pause: a
    context manager factory freezing the container, for the files that keep changing while they are read. Returns a
    MountArchive."""
    known = {} if known is None else known
    source = mount["source"]
    st = os.stat(source)
    entry = dict(mount, uid=st.st_uid, gid=st.st_gid, mode=stat.S_IMODE(st.st_mode), parents=parents_of(source))
    before = previous.get(source)
    if before and before.get("format") == TREE_FORMAT:
        # The previous backup's chunks that the store has (its presence check): an unchanged file takes them.
        bad = {digest for digest, _what in store.missing_blobs({"mounts": [before]})}
        if any(b["digest"] in bad for b in before["index"]):
            before = None  # its listing is damaged or gone: every file is read
        else:
            known.update((b["digest"], dict(b)) for b in before["blobs"] if b["digest"] not in bad)
    now = time.time()
    last_full = (before or {}).get("full_read")
    full = before is None or not last_full or bool(full_read_days and now - last_full >= full_read_days * 86400)
    entry["full_read"] = now if full else last_full
    done = archive_tree(
        store, entry, previous=before, level=level, known=known, full=full, pause=pause, progress=progress
    )
    return MountArchive(done.entry, done.read, done.written, done.warning)


class Restored(NamedTuple):
    """One bind-mount source restored: its path, the folder what the backup did not have was moved to (None when
    nothing was), and the paths moved there (relative to the source)."""

    source: str
    moved_to: str | None
    moved: list


def _kind(mode):
    return "directory" if stat.S_ISDIR(mode) else "symlink" if stat.S_ISLNK(mode) else "file"


def archive_kinds(store, entry):
    """{absolute path: directory, symlink or file} of every member of a bind-mount archive, read from its listing (a
    tree) or its blobs (a tar archive of older backups: a full pass of zstd and tar's headers), before anything
    changes. A member outside the source is refused."""
    if entry.get("format") == TREE_FORMAT:
        return tree_kinds(store, entry)
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
    if entry.get("format") == TREE_FORMAT:
        restore_tree(store, entry)
        return Restored(source, folder, moved)
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
