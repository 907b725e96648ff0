# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""gpulab's container backups: a content-addressed store on the server, and the backup and restore of a container.

Shared by the modules container_backup and container_restore, and run on its own (without Ansible) by the systemd timer
of the role backup: `python3 gpulab_backup.py backup --store DIR --container NAME --keep-last N`.

The store (for example /var/backups/gpulab), root's only (mode 0700):
  blobs/sha256/<hex>                 a blob: zstd-compressed, named by the sha256 of its uncompressed content
  backups/<container>/<id>.json      a backup's manifest, written last: a backup without one does not exist
  tmp/                               temporary files while a blob or manifest is written; removed by the next run
  lock                               flock: one backup at a time (exclusive), restores share it
Every blob and manifest is written to tmp/, fsynced, renamed into place and its folder fsynced, so a killed backup
leaves at worst files in tmp/ and blobs no manifest references, both removed by the next backup.

A manifest holds the image config (the exact JSON, so the restored image has the same ID unless secrets were taken
out of it), the layers (each a list of blobs, concatenated: one for a layer read from `docker save`, content-defined
chunks for a writable layer read from its overlay2 upper directory: the fast path), the container's run
settings, and the archives of its bind-mounted folders and files.

Reading `docker save` (GET /images/<id>/get): a tar stream of the legacy layout (manifest.json, <config>.json,
<dir>/layer.tar: Docker before 25) or of the OCI layout (index.json, blobs/sha256/<digest>: Docker 25 and later), read
in chunks, never held in memory. Layers the store already has are read through without being written again.

Restoring: every blob is checked before Docker changes: its size and the sha256 of its stored file before the engine
is asked for anything, the sha256 of its content before that too (bind-mount archives; every blob with verify=full) or
while it streams (layers; the tar's last member, without which the engine creates nothing, goes only when all matched).
The `docker load` tar is assembled from the blobs as it streams into the engine (layers the engine already has go as
empty placeholders, which `docker load` does not read), the bind-mount sources are unpacked with their owners and
modes, and the container is created again with its saved settings.

Python's standard library only (3.8 or newer) and the zstd and tar programs (Debian packages zstd, tar).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import posixpath
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zlib

try:
    from ansible_collections.gpulab.lab.plugins.module_utils import docker_api as api
    from ansible_collections.gpulab.lab.plugins.module_utils import overlay
except ImportError:  # run outside Ansible (the systemd timer's script)
    import docker_api as api
    import overlay

CHUNK = 1024 * 1024
BLOCK = 512
ZERO_BLOCK = b"\0" * BLOCK
SMALL_FILE = 4 * 1024 * 1024  # manifests, indexes and configs in a save stream are kept in memory up to this size
SYNC_EVERY = 64 * 1024 * 1024  # a blob being written is flushed to disk every so many bytes: no long fsync at the end
FORMAT = "gpulab-backup"
FORMAT_VERSION = 1
DEFAULT_LEVEL = -1  # zstd --fast=1
DEFAULT_FLATTEN_THRESHOLD = 100
DOCKER_MAX_LAYERS = 125
TAG_REPO = "gpulab-backup"
RESTORED_LABEL = "io.gpulab.backup.restored-from"
DEFAULT_SECRET_ENV = [
    "*TOKEN*",
    "*PASSWORD*",
    "*PASSWD*",
    "*SECRET*",
    "*API_KEY*",
    "*APIKEY*",
    "*PRIVATE_KEY*",
    "*CREDENTIAL*",
]
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
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
# Container config keys a re-created container gets back (HostConfig is kept whole, less the keys below).
CONFIG_KEYS = (
    "Hostname",
    "Domainname",
    "User",
    "AttachStdin",
    "AttachStdout",
    "AttachStderr",
    "ExposedPorts",
    "Tty",
    "OpenStdin",
    "StdinOnce",
    "Env",
    "Cmd",
    "Healthcheck",
    "ArgsEscaped",
    "Volumes",
    "WorkingDir",
    "Entrypoint",
    "NetworkDisabled",
    "OnBuild",
    "Labels",
    "StopSignal",
    "StopTimeout",
    "Shell",
)
DROPPED_HOST_CONFIG = ("ContainerIDFile", "MaskedPaths", "ReadonlyPaths", "ConsoleSize")
BUILTIN_NETWORKS = ("bridge", "host", "none", "default")
VERIFY_MODES = ("content", "full", "stored")


class BackupError(Exception):
    """A backup or restore gpulab refuses or could not do, with a message the user can act on."""


class _EngineRefused(BackupError):
    """The engine refused the image we streamed (not a problem of the backup itself)."""


class _NoFastPath(Exception):
    """Why a container's writable layer cannot be read from its upper directory."""


class _GuessedWrong(Exception):
    """A layer skipped because its size matched a stored layer turned out to be another one: read again, hashing all."""


# ---- small helpers -------------------------------------------------------------------------------------------------


def now_utc():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def new_backup_id():
    """Sortable by time (to the millisecond), unique: 20250131T235959.123Z-1a2b3c."""
    now = time.time()
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z-" + os.urandom(3).hex()


def check_name(value, what):
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise BackupError(
            f"{what} {value!r} is not valid: letters, digits, '_', '.' and '-', starting with a letter or digit"
        )
    return value


def sha256_of(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def backup_tag(container, backup_id):
    """(repository, tag) of a restored image: gpulab-backup/<container>:<backup id>, as Docker's grammar allows."""
    component = re.sub(r"[^a-z0-9]+", "-", container.lower()).strip("-") or "container"
    return f"{TAG_REPO}/{component}", backup_id


def zstd_program():
    program = shutil.which("zstd") or shutil.which("zstd", path="/usr/bin:/bin:/usr/local/bin")
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
    program = shutil.which("tar") or shutil.which("tar", path="/usr/bin:/bin")
    if not program:
        raise BackupError("archiving the bind-mounted folders needs the tar program, which this machine lacks")
    return program


def _grow_pipe(fd):
    """1 MiB pipe buffers instead of 64 KiB: fewer context switches between Python and zstd (Linux only)."""
    with contextlib.suppress(OSError, AttributeError, ValueError):
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), CHUNK)


def _write_all(fileobj, data):
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


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def under(path, tree):
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def system_path_reason(path):
    """Why a bind-mount source is a system path gpulab does not archive, or None."""
    real = os.path.realpath(path)
    for candidate in {path, real}:
        if candidate in TOP_LEVEL:
            return f"{candidate} is a top-level system folder"
        for tree in SYSTEM_TREES:
            if under(candidate, tree):
                return f"{candidate} is under {tree}, a system path"
        if posixpath.dirname(candidate) == "/etc" and not os.path.isdir(candidate):
            return f"{candidate} is a system file of /etc"
    return None


class Progress:
    """A long run's progress for an async caller: {phase, seconds, figures...} in a JSON file, at most once a second."""

    def __init__(self, path=None):
        self.file = api.ProgressFile(path)
        self.phase = "start"
        self.figures = {}
        self.timings = {}  # seconds spent in each phase
        self.mark = time.monotonic()

    def set(self, phase, **figures):
        now = time.monotonic()
        self.timings[self.phase] = round(self.timings.get(self.phase, 0.0) + now - self.mark, 2)
        self.mark = now
        self.phase = phase
        self.figures.update(figures)
        self.file.write(phase, force=True, **self.figures)

    def update(self, force=False, **figures):
        self.figures.update(figures)
        self.file.write(self.phase, force=force, **self.figures)

    def remove(self):
        """The run is over: the file goes; returns the seconds spent in each phase."""
        self.set("done")
        with contextlib.suppress(OSError):
            self.file.remove()
        return {k: v for k, v in self.timings.items() if k != "done"}


# ---- the store -----------------------------------------------------------------------------------------------------


class Store:
    """The content-addressed backup store in a folder of the server."""

    def __init__(self, path, create=False):
        if not isinstance(path, str) or not os.path.isabs(path):
            raise BackupError(f"the backup store must be an absolute path on the server, not {path!r}")
        self.path = os.path.normpath(path)
        if os.path.lexists(self.path) and not os.path.isdir(self.path):
            raise BackupError(f"the backup store {self.path} exists and is not a directory")
        if not os.path.isdir(self.path) and not create:
            raise BackupError(f"the backup store {self.path} does not exist: there is no backup to restore")
        self.blobs = os.path.join(self.path, "blobs", "sha256")
        self.backups = os.path.join(self.path, "backups")
        self.tmp = os.path.join(self.path, "tmp")
        self.lock_file = os.path.join(self.path, "lock")

    def create(self):
        for folder in (self.path, os.path.dirname(self.blobs), self.blobs, self.backups, self.tmp):
            if not os.path.isdir(folder):
                os.makedirs(folder, mode=0o700, exist_ok=True)
                fsync_dir(os.path.dirname(folder))

    @contextlib.contextmanager
    def lock(self, exclusive=True, progress=None):
        """flock on <store>/lock: a backup holds it alone, restores share it. Waits (saying so) while it is taken."""
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            if exclusive or not os.path.exists(self.lock_file):
                os.makedirs(self.path, mode=0o700, exist_ok=True)
                fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
            else:
                fd = os.open(self.lock_file, os.O_RDONLY)
        except OSError as e:
            if exclusive:
                raise BackupError(f"the backup store {self.path} cannot be locked for writing: {e}") from e
            yield  # a read-only copy of a store (no backup can write to it): nothing to share the lock with
            return
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if progress:
                    progress.set("waiting for the store's lock (another backup or restore runs)")
                fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # releases the lock

    def clean_tmp(self):
        """Remove what a killed run left in tmp/ (call with the exclusive lock held); returns the names removed."""
        removed = []
        if not os.path.isdir(self.tmp):
            return removed
        for name in sorted(os.listdir(self.tmp)):
            path = os.path.join(self.tmp, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            removed.append(name)
        return removed

    def blob_path(self, digest):
        if not isinstance(digest, str) or not DIGEST_RE.match(digest):
            raise BackupError(f"{digest!r} is not a sha256 digest")
        return os.path.join(self.blobs, digest[len("sha256:") :])

    def blob_size(self, digest):
        """Size on disk of a blob, or None when it is missing."""
        try:
            return os.stat(self.blob_path(digest)).st_size
        except FileNotFoundError:
            return None

    def tmp_file(self, prefix):
        fd, path = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=self.tmp)
        return fd, path

    def commit_file(self, tmp_path, final_path):
        """Rename a complete, fsynced temporary file into place and make the rename durable."""
        os.rename(tmp_path, final_path)
        fsync_dir(os.path.dirname(final_path))

    def keep(self, writer, blob, known):
        """Commit a blob just written (BlobWriter.finish() gave blob) unless the store has that content already;
        known: the blob index (Store.blob_index()), updated. Returns (the blob entry to reference, bytes written).
        A file of that name no manifest describes (left by a killed run) or of another size (damaged) is replaced;
        one that manifests describe is never replaced, as their stored checksums are those of its bytes."""
        digest = blob["digest"]
        if digest in known:
            return dict(known[digest]), 0
        writer.commit(digest)
        known[digest] = dict(blob)
        return dict(blob), blob["stored_size"]

    # manifests

    def manifest_path(self, container, backup_id):
        return os.path.join(
            self.backups, check_name(container, "container name"), check_name(backup_id, "backup id") + ".json"
        )

    def containers(self):
        if not os.path.isdir(self.backups):
            return []
        return sorted(
            n for n in os.listdir(self.backups) if NAME_RE.match(n) and os.path.isdir(os.path.join(self.backups, n))
        )

    def backup_ids(self, container):
        folder = os.path.join(self.backups, check_name(container, "container name"))
        if not os.path.isdir(folder):
            return []
        ids = [n[: -len(".json")] for n in os.listdir(folder) if n.endswith(".json")]
        return sorted(i for i in ids if NAME_RE.match(i))

    def read_manifest(self, container, backup_id):
        path = self.manifest_path(container, backup_id)
        try:
            with open(path, encoding="utf-8") as f:
                manifest = json.load(f)
        except FileNotFoundError:
            raise BackupError(f"the store {self.path} has no backup {backup_id} of container {container}") from None
        except (OSError, ValueError) as e:
            raise BackupError(f"the manifest {path} cannot be read: {e}") from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BackupError(f"{path} is not a gpulab backup manifest")
        if manifest.get("version", 0) > FORMAT_VERSION:
            raise BackupError(f"{path} was written by a newer gpulab (manifest version {manifest['version']})")
        return manifest

    def backups_of(self, container):
        """The manifests of a container, oldest first (by creation time, then id)."""
        manifests = [self.read_manifest(container, i) for i in self.backup_ids(container)]
        return sorted(manifests, key=lambda m: (m.get("created", 0), m["id"]))

    def write_manifest(self, manifest):
        """Write a manifest atomically (the last step of a backup); returns its path and size."""
        folder = os.path.join(self.backups, check_name(manifest["container"], "container name"))
        if not os.path.isdir(folder):
            os.makedirs(folder, mode=0o700, exist_ok=True)
            fsync_dir(self.backups)
        data = json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n"
        fd, tmp = self.tmp_file("manifest-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            final = self.manifest_path(manifest["container"], manifest["id"])
            self.commit_file(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return final, len(data)

    def missing_blobs(self, manifest):
        """(digest, what) of the blobs of a manifest that are missing or have the wrong size on disk."""
        problems = []
        for blob, what in manifest_blobs(manifest):
            size = self.blob_size(blob["digest"])
            if size is None:
                problems.append((blob["digest"], f"{what}: blob {blob['digest']} is missing"))
            elif size != blob["stored_size"]:
                problems.append(
                    (blob["digest"], f"{what}: blob {blob['digest']} has {size} bytes, not {blob['stored_size']}")
                )
        return problems

    def blob_index(self):
        """Blobs that manifests describe and that are on disk with their stored size: digest -> blob entry."""
        index = {}
        for container in self.containers():
            for backup_id in self.backup_ids(container):
                try:
                    manifest = self.read_manifest(container, backup_id)
                except BackupError:
                    continue
                for blob, _ in manifest_blobs(manifest):
                    if blob["digest"] not in index and self.blob_size(blob["digest"]) == blob["stored_size"]:
                        index[blob["digest"]] = dict(blob)
        return index

    def layer_index(self):
        """Layers that manifests describe and whose blobs are all on disk with their stored size: diff_id -> layer
        entry (a layer is a list of blobs: one from docker save, content-defined chunks from an upper directory)."""
        index = {}
        for container in self.containers():
            for backup_id in self.backup_ids(container):
                try:
                    manifest = self.read_manifest(container, backup_id)
                except BackupError:
                    continue
                for layer in manifest.get("layers") or []:
                    blobs = layer.get("blobs") or []
                    if layer["diff_id"] not in index and all(
                        self.blob_size(b["digest"]) == b["stored_size"] for b in blobs
                    ):
                        index[layer["diff_id"]] = {"diff_id": layer["diff_id"], "size": layer["size"], "blobs": blobs}
        return index

    def disk_usage(self):
        """Bytes the store takes on disk (allocated blocks of every file)."""
        total = 0
        for folder, _, files in os.walk(self.path):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(folder, name)).st_blocks * 512
        return total

    # retention

    def retention(self, container, keep_last):
        """Keep the newest keep_last backups of a container (and always the newest complete one); remove the others,
        then every blob no manifest references. Returns (removed backup ids, removed blobs, bytes freed, warnings)."""
        if keep_last < 1:
            raise BackupError("keep_last must be at least 1: the newest backup is never removed")
        manifests = self.backups_of(container)
        keep = {m["id"] for m in manifests[-keep_last:]}
        complete = [m for m in manifests if not self.missing_blobs(m)]
        if complete:
            keep.add(complete[-1]["id"])
        removed = []
        for manifest in manifests:
            if manifest["id"] not in keep:
                os.unlink(self.manifest_path(container, manifest["id"]))
                removed.append(manifest["id"])
        if removed:
            fsync_dir(os.path.join(self.backups, container))
        blobs, freed, warnings = self.collect_garbage()
        return removed, blobs, freed, warnings

    def collect_garbage(self):
        """Remove blobs that no manifest references (call with the exclusive lock held)."""
        referenced = set()
        for container in self.containers():
            for backup_id in self.backup_ids(container):
                try:
                    manifest = self.read_manifest(container, backup_id)
                except BackupError as e:
                    return [], 0, [f"no blob was removed: a manifest cannot be read ({e})"]
                referenced.update(blob["digest"] for blob, _ in manifest_blobs(manifest))
        removed, freed = [], 0
        if not os.path.isdir(self.blobs):
            return removed, freed, []
        for name in sorted(os.listdir(self.blobs)):
            digest = "sha256:" + name
            if digest in referenced:
                continue
            path = os.path.join(self.blobs, name)
            with contextlib.suppress(FileNotFoundError):
                freed += os.lstat(path).st_size
                os.unlink(path)
                removed.append(digest)
        if removed:
            fsync_dir(self.blobs)
        return removed, freed, []

    def pick(self, container, backup_id=None):
        """The manifest to restore: the one named, else the newest complete one. Returns (manifest, warnings)."""
        check_name(container, "container name")
        if backup_id:
            return self.read_manifest(container, check_name(backup_id, "backup id")), []
        manifests = self.backups_of(container)
        if not manifests:
            known = ", ".join(self.containers()) or "none"
            raise BackupError(f"the store {self.path} has no backup of container {container} (containers: {known})")
        warnings = []
        for manifest in reversed(manifests):
            problems = self.missing_blobs(manifest)
            if not problems:
                return manifest, warnings
            warnings.append(f"backup {manifest['id']} is incomplete: {problems[0][1]}")
        newest = manifests[-1]
        raise BackupError(
            f"no complete backup of container {container} in {self.path}; the newest, {newest['id']}, lacks: "
            + "; ".join(p[1] for p in self.missing_blobs(newest))
        )


def manifest_blobs(manifest):
    """(blob entry, what it belongs to) for every blob a manifest references."""
    for i, layer in enumerate(manifest.get("layers") or []):
        for blob in layer.get("blobs") or []:
            yield blob, f"layer {i + 1} ({layer.get('diff_id')})"
    for mount in manifest.get("mounts") or []:
        for blob in mount.get("blobs") or []:
            yield blob, f"the archive of {mount.get('source')}"


# ---- blobs ---------------------------------------------------------------------------------------------------------


class BlobWriter:
    """Compresses the bytes given to write() into a temporary file of the store with zstd, hashing both sides.

    Python hashes and pipes the content to zstd (-T0: all cores); a thread reads zstd's output, hashes it and writes it
    to the file, flushing it to disk as it goes. finish() returns the blob entry, commit() renames the file into place.
    """

    def __init__(self, store, level=DEFAULT_LEVEL):
        self.store = store
        self.fd, self.tmp = store.tmp_file("blob-")
        try:
            self.proc = subprocess.Popen(
                [zstd_program(), zstd_level(level), "-T0", "-q", "-c", "--no-progress"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                bufsize=0,
            )
        except BaseException:
            os.close(self.fd)
            os.unlink(self.tmp)
            raise
        _grow_pipe(self.proc.stdin.fileno())
        _grow_pipe(self.proc.stdout.fileno())
        self.hash = hashlib.sha256()
        self.size = 0
        self.stored_hash = hashlib.sha256()
        self.stored_size = 0
        self.error = None
        self.thread = threading.Thread(target=self._drain, name="zstd-drain", daemon=True)
        self.thread.start()

    def _drain(self):
        synced = 0
        try:
            while True:
                block = self.proc.stdout.read(CHUNK)
                if not block:
                    break
                self.stored_hash.update(block)
                view = memoryview(block)
                while view:
                    view = view[os.write(self.fd, view) :]
                self.stored_size += len(block)
                if self.stored_size - synced >= SYNC_EVERY:
                    # Start writing back what is written so far, without waiting for it (fsync at the end waits).
                    os.posix_fadvise(self.fd, synced, self.stored_size - synced, os.POSIX_FADV_DONTNEED)
                    synced = self.stored_size
        except OSError as e:  # disk full, for example: stop zstd, so that the writer does not wait for ever
            self.error = e
            with contextlib.suppress(OSError):
                self.proc.kill()

    def write(self, data):
        self.hash.update(data)
        self.size += len(data)
        try:
            _write_all(self.proc.stdin, data)
        except BrokenPipeError as e:
            self.thread.join()
            raise BackupError(f"writing a blob to {self.store.tmp} failed: {self.error or 'zstd stopped'}") from e

    def finish(self):
        """Wait for zstd and the file; returns {digest, size, stored_digest, stored_size}."""
        self.proc.stdin.close()
        self.thread.join()
        err = self.proc.stderr.read().decode(errors="replace").strip()
        rc = self.proc.wait()
        if self.error or rc != 0:
            raise BackupError(f"writing a blob to {self.store.tmp} failed: {self.error or err or f'zstd exit {rc}'}")
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        return {
            "digest": "sha256:" + self.hash.hexdigest(),
            "size": self.size,
            "stored_digest": "sha256:" + self.stored_hash.hexdigest(),
            "stored_size": self.stored_size,
        }

    def commit(self, digest):
        self.store.commit_file(self.tmp, self.store.blob_path(digest))
        self.tmp = None

    def abort(self):
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.kill()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                pipe.close()
        self.proc.wait()
        self.thread.join(timeout=5)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)
            self.tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.abort()  # after commit() there is nothing left to remove
        return False


class BlobReader:
    """The uncompressed content of one or more blobs (concatenated), from `zstd -dc`, read in chunks (one zstd for
    each BATCH_PATHS blobs: a layer of thousands of chunks stays within the limits of a command line)."""

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
        _grow_pipe(self.proc.stdout.fileno())

    def _end(self, check=True):
        if not check and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.kill()
        self.proc.stdout.close()
        rc = self.proc.wait()
        self.err.seek(0)
        err = self.err.read().decode(errors="replace").strip()[-2000:]
        self.err.close()
        if check and rc != 0:
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

    def chunks(self):
        return iter(self.read, b"")

    def close(self, check=True):
        self._end(check)


class ChunkedLayerWriter:
    """Stores a layer tar as it is written (write_layer's `out`) as content-defined chunks (gpulab_overlay's
    MemberChunker), each a blob named by the sha256 of its content, so a chunk the store has is never written again.

    New chunks go uncompressed to tmp/ and are compressed in batches, one `zstd --rm` for many files, in the background
    while the layer is still being read (a zstd process per chunk would cost more than the compression). finish() waits
    for them, makes them durable (syncfs: one call, not one fsync per chunk), renames each into blobs/ and fsyncs the
    folder; only then may a manifest name them. abort() removes what is left in tmp/.
    """

    BATCH_BYTES = 32 * 1024 * 1024
    BATCH_FILES = 256
    RUNNING = 2

    def __init__(self, store, known, level=DEFAULT_LEVEL, progress=None, **sizes):
        self.store = store
        self.progress = progress
        self.known = known
        self.level = zstd_level(level)
        self.chunker = overlay.MemberChunker(self._chunk, **sizes)
        self.order = []  # digests, in the layer's order
        self.pending = []  # (digest, size, tmp path) not yet given to zstd
        self.pending_bytes = 0
        self.jobs = []  # (Popen, batch)
        self.new = {}  # digest -> (size, tmp path)
        self.size = 0
        self.chunks_new = 0
        self.chunks_reused = 0
        self.entries = {}  # digest -> blob entry of the chunks compressed so far
        self.written = 0

    # write_layer's output

    def write(self, data):
        return self.chunker.write(data)

    def mark(self, name, size):
        self.chunker.mark(name, size)

    def _chunk(self, data):
        digest = sha256_of(data)
        self.size += len(data)
        self.order.append(digest)
        if digest in self.known or digest in self.new:
            self.chunks_reused += 1
            return
        try:
            fd, path = self.store.tmp_file("chunk-")
        except OSError as e:
            raise BackupError(f"a chunk cannot be written to {self.store.tmp}: {e}") from e
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(path)
            if isinstance(e, OSError):  # the store's disk, not the container's files: not a reason to fall back
                raise BackupError(f"a chunk cannot be written to {self.store.tmp}: {e}") from e
            raise
        self.new[digest] = (len(data), path)
        self.chunks_new += 1
        self.pending.append((digest, len(data), path))
        self.pending_bytes += len(data)
        if len(self.pending) >= self.BATCH_FILES or self.pending_bytes >= self.BATCH_BYTES:
            self._compress()

    def _compress(self):
        """Start a zstd for the pending chunks, after collecting the jobs that ended (at most RUNNING at once)."""
        if not self.pending:
            return
        for job in [job for job in self.jobs if job[0].poll() is not None]:
            self._collect(job)
        if len(self.jobs) >= self.RUNNING:
            self._collect(self.jobs[0])
        batch, self.pending, self.pending_bytes = self.pending, [], 0
        err = tempfile.TemporaryFile()  # noqa: SIM115 (closed in _collect or abort)
        try:
            proc = subprocess.Popen(
                [zstd_program(), self.level, "-q", "-f", "--rm", "--", *(path for _, _, path in batch)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        except OSError as e:
            err.close()
            raise BackupError(f"zstd cannot be started to compress chunks: {e}") from e
        self.jobs.append((proc, batch, err))

    def _collect(self, job):
        """Wait for one zstd job and take its chunks' entries (the compressed files stay in tmp/ until finish)."""
        proc, batch, err = job
        self.jobs.remove(job)
        try:
            rc = proc.wait()
            err.seek(0)
            message = err.read().decode(errors="replace").strip()[-2000:]
        finally:
            err.close()
        if rc != 0:
            raise BackupError(f"zstd could not compress chunks in {self.store.tmp}: {message or f'exit status {rc}'}")
        for digest, size, path in batch:
            compressed = path + ".zst"
            entry = {
                "digest": digest,
                "size": size,
                "stored_digest": file_sha256(compressed),
                "stored_size": os.stat(compressed).st_size,
            }
            self.entries[digest] = entry
            self.written += entry["stored_size"]
        if self.progress:
            self.progress.update(bytes_written=self.written)

    # the end

    def finish(self):
        """Returns (the layer's blob entries in order, bytes written to the store)."""
        self.chunker.close()
        self._compress()
        while self.jobs:
            self._collect(self.jobs[0])
        entries, written = self.entries, self.written
        if entries:
            sync_filesystem(self.store.tmp)
            for digest, (_, path) in self.new.items():
                os.rename(path + ".zst", self.store.blob_path(digest))
            fsync_dir(self.store.blobs)
        self.known.update((digest, dict(entry)) for digest, entry in entries.items())
        self.new = {}
        return [dict(self.known[digest]) for digest in self.order], written

    def abort(self):
        for proc, _, err in self.jobs:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.kill()
            proc.wait()
            err.close()
        self.jobs = []
        for _, path in self.new.values():
            for leftover in (path, path + ".zst"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)
        self.new = {}


# ---- reading tar streams -------------------------------------------------------------------------------------------


def _padding(size):
    return (BLOCK - size % BLOCK) % BLOCK


def _parse_pax(data):
    """The records of a pax extended header: {keyword: value}."""
    records, pos = {}, 0
    try:
        while pos < len(data) and data[pos : pos + 1] != b"\0":
            space = data.index(b" ", pos)
            length = int(data[pos:space])
            record = data[space + 1 : pos + length - 1]
            key, _, value = record.partition(b"=")
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
        for _ in self.data():
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
                data = self._exact(info.size + _padding(info.size))[: info.size]
                if info.type != tarfile.XGLTYPE:
                    extra.update(_parse_pax(data))
                continue
            if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
                data = self._exact(info.size + _padding(info.size))[: info.size]
                key = "path" if info.type == tarfile.GNUTYPE_LONGNAME else "linkpath"
                extra[key] = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
                continue
            size = int(extra["size"]) if "size" in extra else info.size
            member = Member(
                _clean_name(extra.get("path") or info.name), info.type, size, extra.get("linkpath") or info.linkname
            )
            extra = {}
            has_data = member.isfile() or member.type not in tarfile.SUPPORTED_TYPES
            self._left = size if has_data else 0
            yield member
            self._skip(self._left)
            if has_data:
                self._skip(_padding(size))


def _clean_name(name):
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
    return tar_header(name, len(data)) + data + b"\0" * _padding(len(data))


# ---- reading `docker save` into the store --------------------------------------------------------------------------


class SaveIngest:
    """Stores the layers of a `docker save` stream (legacy or OCI layout) as blobs; returns the config and layers.

    known: digest -> blob entry of the blobs the store has (Store.blob_index()); stored: diff_id -> layer entry of
    the layers it has (Store.layer_index(); by default, each blob of known as a layer of its own). expected: the
    image's diff_ids from GET /images/<id>/json (RootFS.Layers), or None. A legacy stream names its layers by folder,
    not by digest, and in the order of those names, not of the layers: a layer.tar whose size is that of exactly one
    expected layer already in the store is read through without being hashed or written (guess_by_size); the manifest
    at the end of the stream then confirms every guess by position, and a wrong guess raises _GuessedWrong (the caller
    reads again, hashing all). Every layer that is written is hashed, and must have the digest the config gives it.
    """

    def __init__(
        self, store, known, *, stored=None, expected=None, level=DEFAULT_LEVEL, guess_by_size=True, progress=None
    ):
        self.store = store
        self.known = known
        if stored is None:
            stored = {d: {"diff_id": d, "size": b["size"], "blobs": [b]} for d, b in known.items()}
        self.stored = stored
        self.expected = list(expected or [])
        self.level = level
        self.guess_by_size = guess_by_size
        self.progress = progress
        self.stored_before = set(stored)
        self.met = collections.Counter()  # layers guessed so far in this stream
        self.files = {}  # small members, kept in memory: name -> bytes
        self.links = {}  # name -> name it links to
        self.layers = {}  # member name -> layer entry
        self.bytes_written = 0
        self.bytes_discarded = 0
        self.reader = None

    def _tick(self, force=False):
        if self.progress and self.reader:
            self.progress.update(force, bytes_read=self.reader.bytes_read, bytes_written=self.bytes_written)

    def read(self, stream):
        """Read the whole stream; returns (config bytes, [layer entries in image order])."""
        reader = self.reader = TarReader(stream, what="the docker save stream")
        for member in reader.members():
            name = member.name
            if member.type == tarfile.SYMTYPE:
                self.links[name] = posixpath.normpath(posixpath.join(posixpath.dirname(name), member.linkname))
            elif member.type == tarfile.LNKTYPE:
                self.links[name] = _clean_name(member.linkname)
            elif not member.isfile():
                continue
            elif name.endswith("/layer.tar"):
                self.layers[name] = self._legacy_layer(reader, member)
            elif name.startswith("blobs/sha256/"):
                self._oci_blob(reader, member)
            elif member.size <= SMALL_FILE:
                self.files[name] = b"".join(reader.data())
            self._tick()
        return self._finish()

    # layers as they come

    def _legacy_layer(self, reader, member):
        guess = self._guess(member.size)
        if guess:
            for _ in reader.data():
                self._tick()
            return self._known_layer(guess, member.size, guessed=True)
        return self._store(reader.data(), member.name)

    def _guess(self, size):
        """The one expected layer, stored before this stream and not yet met in it, that has this size; or None."""
        if not self.guess_by_size:
            return None
        candidates = {
            d
            for d in self.expected
            if d in self.stored_before and self.stored[d]["size"] == size and self.met[d] < self.expected.count(d)
        }
        if len(candidates) != 1:
            return None
        guess = candidates.pop()
        self.met[guess] += 1
        return guess

    def _known_layer(self, digest, size, guessed=False):
        layer = self.stored[digest]
        if layer["size"] != size:
            raise BackupError(f"layer {digest} has {size} bytes in the save stream, but {layer['size']} in the store")
        blobs = [dict(b) for b in layer["blobs"]]
        return {"diff_id": digest, "size": size, "blobs": blobs, "new": False, "guessed": guessed}

    def _oci_blob(self, reader, member):
        digest = "sha256:" + member.name.rsplit("/", 1)[-1]
        if not DIGEST_RE.match(digest):
            return
        if digest in self.stored:
            for _ in reader.data():
                self._tick()
            self.layers[member.name] = self._known_layer(digest, member.size)
        elif digest in self.expected:
            self.layers[member.name] = self._store(reader.data(), member.name, expect=digest)
        elif member.size <= SMALL_FILE:
            self.files[member.name] = b"".join(reader.data())
        else:
            self.layers[member.name] = self._store_blob(reader.data(), member.name, digest)

    def _store_blob(self, chunks, name, digest):
        """An OCI blob that is not a known layer: a gzip-compressed layer (Docker's containerd image store keeps them
        as pulled) is stored uncompressed-content-addressed; anything else must hash to its name."""
        chunks = iter(chunks)
        first = next(chunks, b"")
        rest = _chain([first], chunks)
        if first[:2] == b"\x1f\x8b":
            return self._store_gzip(rest, name, digest)
        return self._store(rest, name, expect=digest)

    def _store_gzip(self, chunks, name, digest):
        compressed = hashlib.sha256()
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)

        def plain():
            for block in chunks:
                compressed.update(block)
                yield inflate.decompress(block)
            yield inflate.flush()

        layer = self._store(plain(), name)
        if "sha256:" + compressed.hexdigest() != digest:
            raise BackupError(f"{name} in the save stream does not have the digest its name says")
        layer["compressed_digest"] = digest
        return layer

    def _store(self, chunks, name, expect=None):
        with BlobWriter(self.store, self.level) as writer:
            for block in chunks:
                if block:
                    writer.write(block)
                    self._tick()
            self._tick(force=True)  # zstd may still work a while on what it has
            blob = writer.finish()
            digest = blob["digest"]
            if expect and digest != expect:
                raise BackupError(f"{name} in the save stream has digest {digest}, not {expect}: the stream is damaged")
            if digest in self.stored:  # already stored (its size matched several layers, so it could not be guessed)
                self.bytes_discarded += blob["stored_size"]
                return self._known_layer(digest, blob["size"])
            kept, written = self.store.keep(writer, blob, self.known)
        self.bytes_written += written
        self.stored[digest] = {"diff_id": digest, "size": blob["size"], "blobs": [kept]}
        return {"diff_id": digest, "size": blob["size"], "blobs": [kept], "new": True, "guessed": False}

    # the end: which layer is which

    def _resolve(self, name):
        name = _clean_name(name)
        for _ in range(16):
            if name not in self.links:
                return name
            name = self.links[name]
        raise BackupError(f"the save stream has a link loop at {name}")

    def _oci_image(self):
        """(config path, [layer paths]) from index.json, following nested indexes to the first image manifest."""

        def load(digest):
            path = "blobs/sha256/" + str(digest).split(":", 1)[-1]
            if path not in self.files:
                raise BackupError(f"the save stream's OCI index names {digest}, which it does not hold")
            return json.loads(self.files[path])

        todo = list(json.loads(self.files["index.json"]).get("manifests") or [])
        for _ in range(64):
            if not todo:
                break
            doc = load(todo.pop(0).get("digest"))
            if "manifests" in doc:
                todo = list(doc["manifests"]) + todo
            elif doc.get("config"):
                layers = ["blobs/sha256/" + d["digest"].split(":", 1)[-1] for d in doc.get("layers") or []]
                return "blobs/sha256/" + doc["config"]["digest"].split(":", 1)[-1], layers
        raise BackupError("the save stream's OCI index names no image manifest")

    def _finish(self):
        try:
            manifest = json.loads(self.files["manifest.json"]) if "manifest.json" in self.files else None
            if isinstance(manifest, list) and manifest:
                config_name, layer_names = manifest[0]["Config"], list(manifest[0]["Layers"])
            elif "index.json" in self.files:
                config_name, layer_names = self._oci_image()
            else:
                raise BackupError("the engine's save stream is no docker save archive: no manifest.json, no index.json")
            config_bytes = self.files.get(self._resolve(config_name))
            if config_bytes is None:
                raise BackupError(f"the save stream lacks the image config {config_name}")
            diff_ids = json.loads(config_bytes)["rootfs"]["diff_ids"]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise BackupError(f"the save stream has a manifest or config gpulab cannot read: {e!r}") from e
        if config_name.startswith("blobs/sha256/") and sha256_of(config_bytes) != "sha256:" + config_name[13:]:
            raise BackupError(f"the image config {config_name} in the save stream does not match its digest")
        if len(layer_names) != len(diff_ids):
            raise BackupError(f"the save stream lists {len(layer_names)} layers, its config {len(diff_ids)}")
        layers = [self._layer_at(i, name, diff_ids[i]) for i, name in enumerate(layer_names)]
        if self.expected and diff_ids != self.expected:
            raise BackupError("the save stream holds other layers than the engine reported for the image")
        return config_bytes, layers

    def _layer_at(self, position, name, diff_id):
        path = self._resolve(name)
        layer = self.layers.get(path)
        if layer is None and path in self.files:  # a small OCI layer blob, kept in memory until now
            data = self.files.pop(path)
            digest = "sha256:" + path.rsplit("/", 1)[-1]
            layer = self.layers[path] = self._store_blob([data], path, digest)
        if layer is None:
            raise BackupError(f"the save stream names layer {name}, which it does not hold")
        if layer["diff_id"] != diff_id:
            if layer.get("guessed"):
                raise _GuessedWrong(path)
            raise BackupError(f"layer {position + 1} ({name}) has digest {layer['diff_id']}, the config says {diff_id}")
        return layer


def _chain(*iterables):
    for iterable in iterables:
        yield from iterable


# ---- run settings --------------------------------------------------------------------------------------------------


def env_name(entry):
    return entry.split("=", 1)[0]


def is_secret(name, patterns):
    return any(fnmatch.fnmatchcase(name.upper(), str(p).upper()) for p in patterns)


def split_env(env, image_env, patterns):
    """(env without secret values, names left out). A variable is left out when its name matches a secret pattern
    and the container set it (an entry identical to one of the image's own is public)."""
    public = set(image_env or [])
    kept, left_out = [], []
    for entry in env or []:
        if entry not in public and is_secret(env_name(entry), patterns):
            left_out.append(env_name(entry))
        else:
            kept.append(entry)
    return kept, left_out


def run_settings(info, image_info, secret_patterns):
    """What it takes to create the container again, from GET /containers/<id>/json (secret values left out)."""
    config = info.get("Config") or {}
    kept = {k: config[k] for k in CONFIG_KEYS if config.get(k) not in (None, "", [], {})}
    image_env = ((image_info or {}).get("Config") or {}).get("Env") or []
    kept["Env"], left_out = split_env(config.get("Env"), image_env, secret_patterns)
    if kept.get("Hostname") == info["Id"][:12]:  # the default: the new container gets its own
        del kept["Hostname"]
    host_config = {k: v for k, v in (info.get("HostConfig") or {}).items() if k not in DROPPED_HOST_CONFIG}
    networks = {}
    for name, network in ((info.get("NetworkSettings") or {}).get("Networks") or {}).items():
        if name in BUILTIN_NETWORKS:
            continue
        endpoint = network or {}
        aliases = [a for a in endpoint.get("Aliases") or [] if a != info["Id"][:12]]
        networks[name] = {k: v for k, v in (("Aliases", aliases), ("IPAMConfig", endpoint.get("IPAMConfig"))) if v}
    state = info.get("State") or {}
    return {
        "name": info["Name"].lstrip("/"),
        "image": config.get("Image"),
        "image_id": info.get("Image"),
        "running": bool(state.get("Running")),
        "config": kept,
        "host_config": host_config,
        "networks": networks,
        "mounts": [
            {
                "type": m.get("Type"),
                "source": m.get("Source") or m.get("Name"),
                "destination": m.get("Destination"),
                "rw": m.get("RW"),
            }
            for m in info.get("Mounts") or []
        ],
        "secret_env": left_out,
    }


def redact_config(config_bytes, secret_names):
    """The image config with the secret variables taken out of config.Env and container_config.Env (a commit copies
    the container's environment into the image). Returns the bytes unchanged when there is nothing to take out."""
    if not secret_names:
        return config_bytes
    config = json.loads(config_bytes)
    for key in ("config", "container_config"):
        section = config.get(key) or {}
        if section.get("Env"):
            section["Env"] = [e for e in section["Env"] if env_name(e) not in secret_names]
    return json.dumps(config, separators=(",", ":")).encode()


# ---- bind-mounted folders and files --------------------------------------------------------------------------------


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
        _grow_pipe(self.proc.stdout.fileno())

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


def archive_mount(store, mount, previous, level, *, known=None, progress=None):
    """Store the archive of one bind-mount source as a blob (not again when its stat signature is that of the
    previous backup's archive; known: the store's blob index). Returns (mount entry, bytes read, bytes written,
    warning)."""
    known = {} if known is None else known
    source = mount["source"]
    st = os.stat(source)
    entry = dict(mount, uid=st.st_uid, gid=st.st_gid, mode=stat.S_IMODE(st.st_mode), parents=parents_of(source))
    entry["signature"] = tree_signature(source)
    before = previous.get(source)
    if before and before.get("signature") == entry["signature"] and not store.missing_blobs({"mounts": [before]}):
        entry.update(size=before["size"], blobs=before["blobs"], reused=True)
        return entry, 0, 0, None
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
    return entry, blob["size"], written, warning


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


def _docker(call, *args, **kwargs):
    """An engine call whose DockerApiError becomes a BackupError."""
    try:
        return call(*args, **kwargs)
    except api.DockerApiError as e:
        raise BackupError(str(e)) from e


class BackupJob:
    """One backup of one container: into the store (commit + save, or export when the image must be flattened), or as
    one `docker load`-able tar (format docker-archive)."""

    def __init__(
        self,
        *,
        container,
        store=None,
        keep_last=3,
        include_workdir=True,
        pause=True,
        fmt="store",
        archive_path=None,
        flatten_threshold=DEFAULT_FLATTEN_THRESHOLD,
        secret_env=None,
        level=DEFAULT_LEVEL,
        docker_host="unix:///var/run/docker.sock",
        timeout=None,
        progress_file=None,
        fast_path=True,
    ):
        self.name = check_name(container, "container name")
        if fmt not in ("store", "docker-archive"):
            raise BackupError(f"format must be store or docker-archive, not {fmt!r}")
        if fmt == "store" and not store:
            raise BackupError("a backup into the store needs store (the store's folder on the server)")
        if fmt == "docker-archive" and not (archive_path and os.path.isabs(archive_path)):
            raise BackupError("format docker-archive needs archive_path, an absolute path of the tar to write")
        if int(keep_last) < 1:
            raise BackupError(f"keep_last must be at least 1 (the newest backup is never removed), not {keep_last}")
        if not 0 <= int(flatten_threshold) <= DOCKER_MAX_LAYERS:
            raise BackupError(
                f"flatten_threshold must be between 1 and Docker's limit of {DOCKER_MAX_LAYERS} layers, or 0 (never)"
            )
        zstd_level(level)
        self.store_path = store
        self.keep_last = int(keep_last)
        self.include_workdir = include_workdir
        self.pause = pause
        self.fmt = fmt
        self.archive_path = archive_path
        self.flatten_threshold = int(flatten_threshold)
        self.secret_patterns = DEFAULT_SECRET_ENV if secret_env is None else list(secret_env)
        self.level = int(level)
        self.timeout = timeout or None
        self.engine = _docker(api.Engine, docker_host, self.timeout)
        self.progress = Progress(progress_file)
        self.warnings = []
        self.fast_path = bool(fast_path)
        self.path_taken = None
        self.path_reason = None

    # what there is

    def inspect(self):
        self.info = _docker(self.engine.container, self.name)
        if self.info is None:
            raise BackupError(f"no container named {self.name} on the Docker engine at {self.engine.socket}")
        self.image_info = _docker(self.engine.image, self.info["Image"]) or {}
        self.base_layers = list((self.image_info.get("RootFS") or {}).get("Layers") or [])
        self.layer_count = len(self.base_layers) + 1
        self.flatten = bool(self.flatten_threshold) and self.layer_count >= self.flatten_threshold
        self.settings = run_settings(self.info, self.image_info, self.secret_patterns)
        self.secrets = self.settings["secret_env"]
        self.mounts, self.skipped = plan_mounts(self.info)
        if not self.include_workdir:
            self.skipped = [
                {
                    "source": m["source"],
                    "destination": m["destination"],
                    "type": "bind",
                    "why": "include_workdir: false",
                }
                for m in self.mounts
            ] + self.skipped
            self.mounts = []
        if self.flatten:
            self.warnings.append(
                f"the image of {self.name} would have {self.layer_count} layers (flatten_threshold "
                f"{self.flatten_threshold}, Docker's limit {DOCKER_MAX_LAYERS}): the backup flattens it into one layer"
            )
        self.upper, self.base_config, refusal = self._fast_path_check()
        if self.flatten:
            self.path_taken, self.path_reason = "export-flatten", "the image is flattened (layer count)"
        elif refusal:
            self.path_taken, self.path_reason = "commit-save", refusal
        else:
            self.path_taken = "overlay-upperdir"

    def _fast_path_check(self):
        """(upper directory, raw config of the container's image, None) when the writable layer can be read directly;
        else (None, None, why not). Whether the image's layers are in the store is settled later."""
        try:
            return (*self._fast_path_parts(), None)
        except _NoFastPath as e:
            return None, None, str(e)

    def _fast_path_parts(self):
        if self.fmt != "store":
            raise _NoFastPath("format docker-archive writes one docker load-able tar from docker save")
        if not self.fast_path:
            raise _NoFastPath("fast_path is off")
        driver = self.info.get("GraphDriver") or {}
        if driver.get("Name") != "overlay2":
            raise _NoFastPath(
                f"the container's storage driver is {driver.get('Name') or 'not reported'}, not overlay2 (Docker's "
                "containerd image store, or another driver)"
            )
        upper = (driver.get("Data") or {}).get("UpperDir")
        if not upper:
            raise _NoFastPath("the engine does not report the container's UpperDir")
        if os.geteuid() != 0:
            raise _NoFastPath("not running as root: the container's writable layer is root's to read")
        if not os.path.isdir(upper):
            raise _NoFastPath(
                f"the container's UpperDir {upper} is not on this machine (an engine on another host, or in a VM)"
            )
        info = _docker(self.engine.json, "GET", "/info")
        root = info.get("DockerRootDir") or "/var/lib/docker"
        image_id = self.info.get("Image") or ""
        path = os.path.join(root, "image", "overlay2", "imagedb", "content", "sha256", image_id.split(":", 1)[-1])
        try:
            with open(path, "rb") as f:
                config = f.read()
        except OSError as e:
            raise _NoFastPath(
                f"the config of the container's image cannot be read from the engine's store ({e})"
            ) from e
        if sha256_of(config) != image_id:
            raise _NoFastPath(f"{path} does not hold the config of image {image_id}")
        return upper, config

    def _result(self):
        return {
            "changed": True,
            "container": self.name,
            "format": self.fmt,
            "backup_id": None,
            "manifest": None,
            "archive_path": self.archive_path if self.fmt == "docker-archive" else None,
            "path_taken": self.path_taken,
            "path_reason": self.path_reason,
            "base_image_stored": False,
            "chunks_new": 0,
            "chunks_reused": 0,
            "paused_seconds": 0.0,
            "bytes_read": 0,
            "bytes_written": 0,
            "layers_new": 0,
            "layers_reused": 0,
            "seconds": 0.0,
            "image_id": None,
            "layer_count": 1 if self.flatten else self.layer_count,
            "flattened": self.flatten,
            "removed_backups": [],
            "removed_blobs": [],
            "mounts": [],
            "skipped_mounts": self.skipped,
            "secret_env_left_out": self.secrets,
            "run_settings": self.settings,
            "warnings": self.warnings,
        }

    def plan(self):
        """Check mode: what a backup would do, changing nothing (the store is not even created)."""
        self.inspect()
        result = self._result()
        result["check_mode"] = True
        layers = [] if self.flatten else self.base_layers
        in_store, remove = 0, []
        if self.fmt == "store":
            store = Store(self.store_path, create=True)
            if os.path.isdir(store.path):
                index = store.layer_index()
                in_store = sum(1 for d in layers if d in index)
                ids = [m["id"] for m in store.backups_of(self.name)] if os.path.isdir(store.backups) else []
                remove = ids[: max(0, len(ids) + 1 - self.keep_last)]
        if self.path_taken == "overlay-upperdir" and in_store < len(layers):
            result["base_image_stored"] = True  # would be: the image's layers go into the store first
        how = {
            "export-flatten": "export and flatten",
            "commit-save": "commit and save",
            "overlay-upperdir": "read the writable layer (overlay2 upper directory) of",
        }[self.path_taken]
        result.update(
            layers_reused=in_store,
            layers_new=result["layer_count"] - in_store,
            removed_backups=remove,
            mounts=[dict(m) for m in self.mounts],
            msg=(
                f"would {how} container {self.name} ({'paused' if self.pause else 'not paused'})"
                + (f" ({self.path_reason})" if self.path_reason else "")
                + (", after storing its image's layers" if result["base_image_stored"] else "")
                + f", store up to {result['layers_new']} new layer(s) "
                f"({in_store} already in the store), archive {len(self.mounts)} bind mount(s)"
                + (f" and remove backup(s) {', '.join(remove)}" if remove else "")
            ),
        )
        return result

    def run(self):
        started = time.monotonic()
        self.inspect()
        result = self._run_archive() if self.fmt == "docker-archive" else self._run_store()
        result["seconds"] = round(time.monotonic() - started, 2)
        result["timings"] = self.progress.remove()
        return result

    # into the store

    def _previous_mounts(self, store):
        with contextlib.suppress(BackupError):
            manifests = store.backups_of(self.name)
            if manifests:
                return {m["source"]: m for m in manifests[-1].get("mounts") or []}
        return {}

    def _archive_mounts(self, store, previous, known, figures):
        entries = []
        for mount in self.mounts:
            self.progress.set("archiving bind mounts", mount=mount["source"])
            entry, read, written, warning = archive_mount(
                store, mount, previous, self.level, known=known, progress=self.progress
            )
            entries.append(entry)
            figures["bytes_read"] += read
            figures["bytes_written"] += written
            if warning:
                self.warnings.append(warning)
        return entries

    def _run_store(self):
        store = Store(self.store_path, create=True)
        store.create()
        result = self._result()
        figures = {"bytes_read": 0, "bytes_written": 0, "bytes_discarded": 0}
        with store.lock(exclusive=True, progress=self.progress):
            self._unpause_after_a_killed_run(store)
            cleaned = store.clean_tmp()
            if cleaned:
                self.warnings.append(
                    f"removed {len(cleaned)} temporary file(s) an interrupted backup left in the store"
                )
            known = store.blob_index()
            stored = store.layer_index()
            previous = self._previous_mounts(store)
            backup_id = new_backup_id()
            mounts = []

            def archive_mounts():
                mounts.extend(self._archive_mounts(store, previous, known, figures))

            layers = None
            if self.path_taken == "export-flatten":
                config_bytes, layers, source_id = self._export_layer(store, known, figures, archive_mounts)
            elif self.path_taken == "overlay-upperdir":
                got = self._upper_layer(store, (known, stored), figures, backup_id, result)
                if got:
                    config_bytes, layers, source_id = got
                    archive_mounts()
            if layers is None:
                config_bytes, layers, source_id = self._commit_and_save(
                    store, (known, stored), figures, backup_id, archive_mounts
                )
            config_bytes = redact_config(config_bytes, set(self.secrets))
            manifest = self._manifest(backup_id, config_bytes, layers, source_id, mounts)
            self.progress.set("writing the manifest")
            path, size = store.write_manifest(manifest)
            figures["bytes_written"] += size
            self.progress.set("retention")
            removed, blobs, freed, warnings = store.retention(self.name, self.keep_last)
            self.warnings.extend(warnings)
            result.update(
                backup_id=backup_id,
                manifest=path,
                path_taken=self.path_taken,
                path_reason=self.path_reason,
                image_id=manifest["image"]["id"],
                layer_count=len(layers),
                layers_new=sum(1 for layer in layers if layer["new"]),
                layers_reused=sum(1 for layer in layers if not layer["new"]),
                removed_backups=removed,
                removed_blobs=blobs,
                bytes_freed=freed,
                mounts=[{k: m[k] for k in ("source", "destination", "kind", "size", "reused")} for m in mounts],
                store_bytes=store.disk_usage(),
                **figures,
            )
        return result

    def _manifest(self, backup_id, config_bytes, layers, source_id, mounts):
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "id": backup_id,
            "container": self.name,
            "created": time.time(),
            "created_utc": now_utc(),
            "path_taken": self.path_taken,
            "path_reason": self.path_reason,
            "flattened": self.flatten,
            "image": {
                "id": sha256_of(config_bytes),
                "committed_id": source_id,
                "config": config_bytes.decode("utf-8"),
                "layer_count": len(layers),
                "source_image": self.settings["image"],
                "source_image_id": self.settings["image_id"],
            },
            "layers": [{"diff_id": x["diff_id"], "size": x["size"], "blobs": x["blobs"]} for x in layers],
            "mounts": mounts,
            "skipped_mounts": self.skipped,
            "run_settings": self.settings,
            "secret_env": self.secrets,
        }

    # the fast path: the writable layer read from the overlay2 upper directory

    def _pause_marker(self, store):
        return os.path.join(store.tmp, f"paused-{self.info['Id']}")

    def _unpause_after_a_killed_run(self, store):
        """A backup killed while it held a container paused (SIGKILL: no cleanup) left a marker paused-<id> in tmp/:
        that container is still frozen. Thaw every such container, this one or another (the marker proves gpulab
        froze it, not its user), before clean_tmp removes the markers; then read this container's state again, as
        it was inspected before the lock was taken."""
        for name in sorted(os.listdir(store.tmp)) if os.path.isdir(store.tmp) else []:
            if not name.startswith("paused-"):
                continue
            info = _docker(self.engine.container, name[len("paused-") :])
            if info and (info.get("State") or {}).get("Paused"):
                _docker(self.engine.json, "POST", f"/containers/{info['Id']}/unpause")
                self.warnings.append(
                    f"{info['Name'].lstrip('/')} was left paused by a backup that was killed: it was unpaused"
                )
        fresh = _docker(self.engine.container, self.info["Id"])
        if fresh:
            self.info["State"] = fresh.get("State") or {}

    @contextlib.contextmanager
    def _paused(self, store=None, result=None):
        """The container paused for the block, when it runs, its user has not paused it and pause is on. With a
        store, a marker in tmp/ (fsynced before the pause) lets the next backup thaw it should this process be
        killed meanwhile. result["paused_seconds"] gets the time."""
        state = self.info.get("State") or {}
        if not (self.pause and state.get("Running") and not state.get("Paused")):
            yield
            return
        marker = self._pause_marker(store) if store else None
        if marker:
            with open(marker, "wb") as f:  # empty; fsynced: it must outlive a SIGKILL
                os.fsync(f.fileno())
            fsync_dir(store.tmp)
        _docker(self.engine.json, "POST", f"/containers/{self.info['Id']}/pause")
        started = time.monotonic()
        try:
            yield
        finally:
            _docker(self.engine.json, "POST", f"/containers/{self.info['Id']}/unpause")
            if result is not None:
                result["paused_seconds"] = round(time.monotonic() - started, 2)
            if marker:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(marker)

    def _upper_layer(self, store, index, figures, backup_id, result):
        """(config, layers, None) of the container's image plus its writable layer read from the upper directory, or
        None (self.path_taken and path_reason then say commit-save and why) when the upper directory cannot be read
        as a layer. The image's layers are saved into the store first when it lacks some (no pause, no commit)."""
        known, stored = index
        if any(d not in stored for d in self.base_layers):
            self.progress.set("save: the container's image, into the store")
            self.base_config, base = self._save_image(store, index, figures, self.info["Image"], None)
            result["base_image_stored"] = True
        else:
            base = [dict(stored[d], new=False) for d in self.base_layers]
        self.progress.set("reading the writable layer", upper=self.upper)
        writer = ChunkedLayerWriter(store, known, self.level, self.progress)
        unreadable = None
        try:
            with self._paused(store, result):
                try:  # only what reading the upper directory raises: the store's own errors are errors
                    stats = overlay.write_layer(
                        self.upper, writer, progress=lambda st: self.progress.update(bytes_read=st["bytes"])
                    )
                except (overlay.UnsupportedOverlay, OSError) as e:
                    unreadable = e
            if unreadable is None:
                self.progress.set(
                    "compressing the new chunks", bytes_written=writer.written, chunks_new=writer.chunks_new
                )
                blobs, written = writer.finish()
        except BaseException:
            writer.abort()
            raise
        if unreadable is not None:
            writer.abort()
            result["paused_seconds"] = 0.0
            self.path_taken = "commit-save"
            self.path_reason = f"the writable layer could not be read as a layer: {unreadable}"
            self.warnings.append(f"{self.name}: {self.path_reason}; the backup commits and saves the container instead")
            return None
        figures["bytes_read"] += stats["tar_bytes"]
        figures["bytes_written"] += written
        result["chunks_new"] = writer.chunks_new
        result["chunks_reused"] = writer.chunks_reused
        layer = {"diff_id": stats["diff_id"], "size": stats["tar_bytes"], "blobs": blobs, "new": bool(written)}
        config = self._upper_config(stats["diff_id"], backup_id)
        return config, [*base, layer], None

    def _upper_config(self, diff_id, backup_id):
        """The image config `docker commit` would write: the container's image's, with the container's config, one
        more layer and one more history entry."""
        image = json.loads(self.base_config)
        now = now_utc()
        config = {k: v for k, v in (self.info.get("Config") or {}).items() if k in (*CONFIG_KEYS, "Image")}
        config["Env"] = self.settings["config"]["Env"]  # without the secret values
        for key in ("container", "container_config", "id", "parent"):
            image.pop(key, None)
        image.update(created=now, config=config)
        image["rootfs"] = {"type": "layers", "diff_ids": [*self.base_layers, diff_id]}
        image["history"] = [
            *(image.get("history") or []),
            {
                "created": now,
                "created_by": f"gpulab container_backup: the writable layer of {self.name}",
                "comment": f"gpulab backup {backup_id} of {self.name}",
            },
        ]
        return json.dumps(image, separators=(",", ":")).encode()

    def _commit(self, backup_id, repo=None, tag=None):
        self.progress.set("commit")
        path = api.query(
            "/commit",
            container=self.info["Id"],
            pause="1" if self.pause else "0",
            comment=f"gpulab backup {backup_id} of {self.name}",
            author="gpulab container_backup",
            repo=repo,
            tag=tag,
        )
        return _docker(self.engine.json, "POST", path, timeout=self.timeout)["Id"]

    def _remove_image(self, ref):
        status, body = _docker(self.engine.request, "DELETE", api.query(f"/images/{api.quoted(ref)}", noprune="1"))
        if status not in (200, 404):
            self.warnings.append(f"the committed image {ref} could not be removed: {api.error_of(body)}")

    def _commit_and_save(self, store, index, figures, backup_id, while_exporting):
        image_id = self._commit(backup_id)
        try:
            config_bytes, layers = self._save_image(store, index, figures, image_id, while_exporting)
            return config_bytes, layers, image_id
        finally:
            self._remove_image(image_id)

    def _save_image(self, store, index, figures, image_id, while_exporting):
        """Store the layers of an image from GET /images/<id>/get; returns (its config, its layer entries)."""
        expected = (_docker(self.engine.image, image_id) or {}).get("RootFS", {}).get("Layers")
        guess = True
        while True:
            pending = _docker(self.engine.start_get, f"/images/{api.quoted(image_id)}/get")
            if while_exporting:  # the engine writes the whole image to a folder of its own before it answers
                while_exporting()
                while_exporting = None
            self.progress.set("save: the engine exports the image")
            resp = _docker(pending.response)
            self.progress.set("save")
            ingest = SaveIngest(
                store,
                index[0],
                stored=index[1],
                expected=expected,
                level=self.level,
                guess_by_size=guess,
                progress=self.progress,
            )
            try:
                config_bytes, layers = ingest.read(resp)
            except _GuessedWrong as e:
                self.warnings.append(f"{e} was not the layer its size suggested: the image was read again")
                guess = False
                continue
            finally:
                resp.close()
                figures["bytes_read"] += ingest.reader.bytes_read if ingest.reader else 0
                figures["bytes_written"] += ingest.bytes_written
                figures["bytes_discarded"] += ingest.bytes_discarded
            return config_bytes, layers

    def _export_stream(self, consume, store=None):
        """GET /containers/<id>/export (the container's whole file system), paused while it is read (with a marker
        in the store's tmp/ when there is a store)."""
        with self._paused(store):
            resp = _docker(self.engine.get_stream, f"/containers/{self.info['Id']}/export")
            try:
                return consume(resp)
            finally:
                resp.close()

    def _flat_config(self, diff_id):
        now = now_utc()
        config = {k: v for k, v in (self.info.get("Config") or {}).items() if k in (*CONFIG_KEYS, "Image")}
        config["Env"] = self.settings["config"]["Env"]  # without the secret values
        return json.dumps(
            {
                "architecture": self.image_info.get("Architecture") or "amd64",
                "os": self.image_info.get("Os") or "linux",
                "created": now,
                "config": config,
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                "history": [
                    {
                        "created": now,
                        "created_by": f"gpulab container_backup: {self.name} flattened from {self.layer_count} layers",
                    }
                ],
            },
            separators=(",", ":"),
        ).encode()

    def _export_layer(self, store, known, figures, while_exporting):
        while_exporting()
        self.progress.set("export (flatten)")

        def consume(resp):
            with BlobWriter(store, self.level) as writer:
                for block in iter(lambda: resp.read(CHUNK), b""):
                    writer.write(block)
                    self.progress.update(bytes_read=writer.size, bytes_written=writer.stored_size)
                blob = writer.finish()
                kept, written = store.keep(writer, blob, known)
            figures["bytes_read"] += blob["size"]
            figures["bytes_written"] += written
            return {"diff_id": blob["digest"], "size": blob["size"], "blobs": [kept], "new": bool(written)}

        layer = self._export_stream(consume, store)
        return self._flat_config(layer["diff_id"]), [layer], None

    # one docker load-able tar

    def _run_archive(self):
        folder = os.path.dirname(self.archive_path)
        if not os.path.isdir(folder):
            raise BackupError(f"the folder of archive_path, {folder}, does not exist on the server")
        if os.path.isdir(self.archive_path):
            raise BackupError(f"archive_path {self.archive_path} is a folder; give the path of the tar file to write")
        result = self._result()
        backup_id = new_backup_id()
        repo, tag = backup_tag(self.name, backup_id)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(self.archive_path) + ".", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w+b") as out:
                if self.flatten:
                    config_bytes, read = self._archive_flat(out, f"{repo}:{tag}")
                else:
                    config_bytes, read = self._archive_saved(out, backup_id, repo, tag)
                self._archive_extras(out, backup_id, config_bytes)
                out.write(ZERO_BLOCK * 2)
                out.flush()
                os.fsync(out.fileno())
                size = out.tell()
            os.rename(tmp, self.archive_path)
            fsync_dir(folder)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        layers = json.loads(config_bytes)["rootfs"]["diff_ids"]
        result.update(
            backup_id=backup_id,
            image_id=sha256_of(config_bytes),
            image=f"{repo}:{tag}",
            layer_count=len(layers),
            layers_new=len(layers),
            bytes_read=read,
            bytes_written=size,
            mounts=[dict(m) for m in self.mounts],
        )
        if self.secrets and not self.flatten:
            self.warnings.append(
                "format docker-archive keeps the image config as docker save wrote it: the values of "
                + ", ".join(self.secrets)
                + " are in it"
            )
        return result

    def _archive_saved(self, out, backup_id, repo, tag):
        image_id = self._commit(backup_id, repo=repo, tag=tag)
        try:
            pending = _docker(self.engine.start_get, f"/images/{api.quoted(repo + ':' + tag)}/get")
            self.progress.set("save: the engine exports the image")
            resp = _docker(pending.response)
            self.progress.set("save")
            reader = TarReader(resp, sink=out.write, what="the docker save stream")
            files = {}
            try:
                for member in reader.members():
                    if member.isfile() and member.name.endswith(".json") and member.size <= SMALL_FILE:
                        files[member.name] = b"".join(reader.data())
                    self.progress.update(bytes_read=reader.bytes_read, bytes_written=reader.bytes_read)
            finally:
                resp.close()
            manifest = json.loads(files["manifest.json"])
            config_bytes = files[manifest[0]["Config"]]
            out.truncate(reader.end_offset)  # the end-of-archive blocks: gpulab's own members come after the image
            out.seek(reader.end_offset)
            return config_bytes, reader.bytes_read
        finally:
            self._remove_image(image_id)

    def _archive_flat(self, out, repo_tag):
        self.progress.set("export (flatten)")
        digest = hashlib.sha256()
        header_at = out.tell()
        out.write(ZERO_BLOCK)  # the header of layer.tar, written once its size is known

        def consume(resp):
            size = 0
            for block in iter(lambda: resp.read(CHUNK), b""):
                digest.update(block)
                out.write(block)
                size += len(block)
            return size

        size = self._export_stream(consume)
        out.write(b"\0" * _padding(size))
        end = out.tell()
        out.seek(header_at)
        out.write(tar_header("layer/layer.tar", size))
        out.seek(end)
        config_bytes = self._flat_config("sha256:" + digest.hexdigest())
        config_name = sha256_of(config_bytes)[7:] + ".json"
        out.write(tar_member(config_name, config_bytes))
        load_manifest = [{"Config": config_name, "RepoTags": [repo_tag], "Layers": ["layer/layer.tar"]}]
        out.write(tar_member("manifest.json", json.dumps(load_manifest).encode()))
        return config_bytes, size

    def _archive_extras(self, out, backup_id, config_bytes):
        """gpulab's own members after the image (docker load ignores them): the run settings, and a tar of each bind
        mount source, so that the one file holds all a restore needs."""
        entries = []
        for i, mount in enumerate(self.mounts):
            self.progress.set("archiving bind mounts", mount=mount["source"])
            name = f"gpulab-backup/mounts/{i}.tar"
            header_at = out.tell()
            out.write(ZERO_BLOCK)
            tar = TarOf(mount["source"])
            size = 0
            for block in tar.chunks():
                out.write(block)
                size += len(block)
            warning = tar.close()
            if warning:
                self.warnings.append(warning)
            out.write(b"\0" * _padding(size))
            end = out.tell()
            out.seek(header_at)
            out.write(tar_header(name, size))
            out.seek(end)
            entries.append({**mount, "member": name, "size": size, "parents": parents_of(mount["source"])})
        info = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "id": backup_id,
            "container": self.name,
            "created_utc": now_utc(),
            "image_id": sha256_of(config_bytes),
            "run_settings": self.settings,
            "mounts": entries,
            "skipped_mounts": self.skipped,
            "secret_env": self.secrets,
        }
        out.write(tar_member("gpulab-backup/backup.json", json.dumps(info, indent=1, sort_keys=True).encode()))


# ---- restore -------------------------------------------------------------------------------------------------------


def _verify_blob(store, blob, what, content):
    path = store.blob_path(blob["digest"])
    try:
        stored = file_sha256(path)
    except FileNotFoundError:
        return f"{what}: blob {blob['digest']} is missing"
    if stored != blob["stored_digest"]:
        return f"{what}: blob {blob['digest']} is corrupt (its file has {stored}, not {blob['stored_digest']})"
    if not content:
        return None
    reader = BlobReader([path])
    digest, size = hashlib.sha256(), 0
    try:
        for chunk in reader.chunks():
            digest.update(chunk)
            size += len(chunk)
        reader.close()
    except BackupError as e:
        reader.close(check=False)
        return f"{what}: blob {blob['digest']} cannot be decompressed ({e})"
    if "sha256:" + digest.hexdigest() != blob["digest"] or size != blob["size"]:
        return f"{what}: blob {blob['digest']} is corrupt (its content has sha256:{digest.hexdigest()}, {size} bytes)"
    return None


BATCH_VERIFY_SIZE = 8 * 1024 * 1024
BATCH_VERIFY_FILES = 256


def _verify_batch(store, items):
    """True when every blob of items (small ones with a content check) has its stored sha256, and `zstd -dc` of all of
    them, cut by their sizes, gives each one's content sha256."""
    try:
        if any(file_sha256(store.blob_path(blob["digest"])) != blob["stored_digest"] for blob, _, _ in items):
            return False
    except FileNotFoundError:
        return False
    reader = BlobReader(store.blob_path(blob["digest"]) for blob, _, _ in items)
    good = False
    try:
        good = all(_read_digest(reader, blob["size"]) == blob["digest"] for blob, _, _ in items) and not reader.read(1)
    except BackupError:
        good = False
    finally:
        try:
            reader.close(check=good)
        except BackupError:
            good = False
    return good


def _read_digest(reader, size):
    """sha256 of the next `size` bytes of reader (None when it ends before)."""
    digest = hashlib.sha256()
    while size:
        data = reader.read(min(size, CHUNK))
        if not data:
            return None
        digest.update(data)
        size -= len(data)
    return "sha256:" + digest.hexdigest()


def verify_backup(store, manifest, *, layer_content=True, mount_content=True, progress=None, workers=2):
    """Check the blobs of a backup: every one present, with its size and the sha256 of its stored file; and the sha256
    of what it decompresses to, for the layers (layer_content) and the bind-mount archives (mount_content). Raises
    BackupError naming every bad blob. Returns {blobs, stored_bytes, content_bytes}: the figures checked."""
    missing = store.missing_blobs(manifest)
    if missing:
        raise BackupError(
            f"backup {manifest['id']} of {manifest['container']} is damaged; nothing was changed: "
            + "; ".join(sorted({m[1] for m in missing}))
        )
    mount_digests = {b["digest"] for m in manifest.get("mounts") or [] for b in m.get("blobs") or []}
    blobs = {}
    for blob, what in manifest_blobs(manifest):
        content = mount_content if blob["digest"] in mount_digests else layer_content
        known = blobs.get(blob["digest"])
        blobs[blob["digest"]] = (blob, what, content or (known is not None and known[2]))
    todo = sorted(blobs.values(), key=lambda item: -item[0]["stored_size"])
    done = {"bytes": 0}
    lock = threading.Lock()

    def tick(items):
        with lock:
            done["bytes"] += sum(item[0]["stored_size"] for item in items)
            if progress:
                progress.update(verified_bytes=done["bytes"])

    def check(item):
        problem = _verify_blob(store, *item)
        tick([item])
        return [problem] if problem else []

    def check_batch(
        items,
    ):  # small blobs (a layer's chunks): one zstd for many; a failing batch is checked blob by blob
        if _verify_batch(store, items):
            tick(items)
            return []
        return [p for item in items for p in check(item)]

    big = [item for item in todo if not item[2] or item[0]["stored_size"] > BATCH_VERIFY_SIZE]
    small = [item for item in todo if item[2] and item[0]["stored_size"] <= BATCH_VERIFY_SIZE]
    work = [(check, item) for item in big] + [
        (check_batch, small[i : i + BATCH_VERIFY_FILES]) for i in range(0, len(small), BATCH_VERIFY_FILES)
    ]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        problems = [p for found in pool.map(lambda job: job[0](job[1]), work) for p in found]
    if problems:
        raise BackupError(
            f"backup {manifest['id']} of {manifest['container']} is damaged; nothing was changed: "
            + "; ".join(problems)
        )
    return {
        "blobs": len(todo),
        "stored_bytes": sum(item[0]["stored_size"] for item in todo),
        "content_bytes": sum(item[0]["size"] for item in todo if item[2]),
    }


class LoadTar:
    """A `docker load` tar (legacy layout) assembled on the fly from a backup's blobs, read in chunks.

    The first `skip` layers, which the engine already has (their chain), go as empty files: docker load looks a layer
    up by its chain before it reads the file. With check_content, the sha256 of each layer is computed as it streams;
    a layer of another digest or size (or a zstd error) breaks the stream off before its last member, manifest.json,
    without which the engine creates nothing: the engine discards what it received, and keeps no image."""

    def __init__(self, store, config_bytes, layers, repo_tag, *, skip=0, progress=None, check_content=True):
        self.store = store
        self.config = config_bytes
        self.layers = layers
        self.repo_tag = repo_tag
        self.skip = skip
        self.progress = progress
        self.check_content = check_content
        self.sent = 0
        self.gen = self._pieces()
        self.pending = b""

    def _layer(self, layer):
        reader = BlobReader(self.store.blob_path(b["digest"]) for b in layer["blobs"])
        digest = hashlib.sha256() if self.check_content else None
        size = 0
        try:
            for chunk in reader.chunks():
                size += len(chunk)
                if digest:
                    digest.update(chunk)
                yield chunk
            reader.close()
        except BaseException:
            reader.close(check=False)
            raise
        if size != layer["size"]:
            raise BackupError(f"layer {layer['diff_id']} decompresses to {size} bytes, not {layer['size']}")
        if digest and "sha256:" + digest.hexdigest() != layer["diff_id"]:
            raise BackupError(
                f"layer {layer['diff_id']} is corrupt: its blobs decompress to sha256:{digest.hexdigest()}"
            )
        yield b"\0" * _padding(size)

    def _pieces(self):
        names = []
        for i, layer in enumerate(self.layers):
            name = f"{i + 1:03d}-{layer['diff_id'][7:19]}/layer.tar"
            names.append(name)
            if i < self.skip:
                yield tar_header(name, 0)
                continue
            yield tar_header(name, layer["size"])
            yield from self._layer(layer)
        config_name = sha256_of(self.config)[7:] + ".json"
        yield tar_member(config_name, self.config)
        manifest = [{"Config": config_name, "RepoTags": [self.repo_tag], "Layers": names}]
        yield tar_member("manifest.json", json.dumps(manifest).encode())
        yield ZERO_BLOCK * 2

    def read(self, size=CHUNK):
        while not self.pending:
            piece = next(self.gen, None)
            if piece is None:
                return b""
            self.pending = piece
        data, self.pending = self.pending[:size], self.pending[size:]
        self.sent += len(data)
        if self.progress:
            self.progress.update(bytes_sent=self.sent)
        return data

    def close(self):
        self.gen.close()


class RestoreJob:
    """Restore one container from the store: verify, load the image, unpack the bind-mount sources, create it again."""

    def __init__(
        self,
        *,
        store,
        container,
        backup=None,
        force=False,
        restore_workdir=True,
        verify_only=False,
        verify="content",
        env=None,
        start=None,
        docker_host="unix:///var/run/docker.sock",
        timeout=None,
        progress_file=None,
    ):
        self.name = check_name(container, "container name")
        self.backup_id = check_name(backup, "backup id") if backup else None
        if verify not in VERIFY_MODES:
            raise BackupError(f"verify must be one of {', '.join(VERIFY_MODES)}, not {verify!r}")
        self.store = Store(store)
        self.force = force
        self.restore_workdir = restore_workdir
        self.verify_only = verify_only
        self.verify = verify
        self.env = {str(k): "" if v is None else str(v) for k, v in (env or {}).items()}
        self.start = start
        self.docker_host = docker_host
        self.timeout = timeout or None
        self.progress = Progress(progress_file)
        self.warnings = []
        self.engine = None

    def run(self, check_mode=False):
        started = time.monotonic()
        with self.store.lock(exclusive=False, progress=self.progress):
            manifest, warnings = self.store.pick(self.name, self.backup_id)
            self.warnings.extend(warnings)
            result = self._result(manifest)
            existing = None
            if not self.verify_only:
                self.engine = _docker(api.Engine, self.docker_host, self.timeout)
                existing = _docker(self.engine.container, self.name)
                if existing and not self.force:
                    result.update(
                        changed=False,
                        container_exists=True,
                        msg=f"container {self.name} exists on the engine and was left alone (force: true replaces it "
                        f"with backup {manifest['id']})",
                    )
                    return result
                self._check_can_create(manifest)
            self.progress.set("verify")
            if check_mode and not self.verify_only:
                problems = self.store.missing_blobs(manifest)
                if problems:
                    raise BackupError(f"backup {manifest['id']} is damaged: " + "; ".join(p[1] for p in problems))
                result.update(verified="sizes", msg=self._would(manifest, existing))
                return result
            full = self.verify == "full" or self.verify_only
            figures = verify_backup(
                self.store,
                manifest,
                layer_content=full,
                mount_content=self.verify != "stored" and (self.restore_workdir or self.verify_only),
                progress=self.progress,
            )
            result.update(
                verified="full" if full else self.verify,
                verified_blobs=figures["blobs"],
                verified_bytes=figures["stored_bytes"],
                verified_content_bytes=figures["content_bytes"],
            )
            if self.verify_only:
                result.update(changed=False, msg=f"backup {manifest['id']} of {self.name} is complete and intact")
                return result
            self._restore(manifest, existing, result)
        result["seconds"] = round(time.monotonic() - started, 2)
        result["timings"] = self.progress.remove()
        return result

    def _result(self, manifest):
        repo, tag = backup_tag(self.name, manifest["id"])
        return {
            "changed": True,
            "container": self.name,
            "backup_id": manifest["id"],
            "manifest": self.store.manifest_path(self.name, manifest["id"]),
            "image": f"{repo}:{tag}",
            "image_id": manifest["image"]["id"],
            "verified": None,
            "verified_blobs": 0,
            "verified_bytes": 0,
            "verified_content_bytes": 0,
            "image_loaded": False,
            "layers_sent": 0,
            "layers_present": 0,
            "bytes_sent": 0,
            "workdir_restored": [],
            "replaced_container": False,
            "container_id": None,
            "container_started": False,
            "seconds": 0.0,
            "warnings": self.warnings,
        }

    def _would(self, manifest, existing):
        mounts = [m["source"] for m in manifest.get("mounts") or []] if self.restore_workdir else []
        return (
            f"would load backup {manifest['id']} of {self.name} ({len(manifest['layers'])} layers), "
            + (f"restore {', '.join(mounts)}, " if mounts else "")
            + ("replace the existing container" if existing else "create the container")
            + (" and start it" if self._should_start(manifest) else "")
        )

    def _should_start(self, manifest):
        return manifest["run_settings"].get("running", False) if self.start is None else bool(self.start)

    def _check_can_create(self, manifest):
        """What would make the container's creation fail, found before anything changes."""
        settings = manifest["run_settings"]
        missing = [n for n in manifest.get("secret_env") or [] if n not in self.env]
        if missing:
            raise BackupError(
                f"backup {manifest['id']} of {self.name} left out the value of {', '.join(missing)} (secrets are not "
                "stored): give them with env. Nothing was changed."
            )
        mode = str(settings["host_config"].get("NetworkMode") or "")
        if mode.startswith("container:"):
            raise BackupError(f"{self.name} shared the network of another container ({mode}); gpulab cannot restore it")
        for network in sorted(set(settings.get("networks") or {}) | ({mode} - {"", *BUILTIN_NETWORKS})):
            status, _ = _docker(self.engine.request, "GET", f"/networks/{api.quoted(network)}")
            if status == 404:
                raise BackupError(f"{self.name} was on network {network}, which the engine lacks: create it first")

    def _restore(self, manifest, existing, result):
        self._load_image(manifest, result)
        if existing:
            self.progress.set("removing the existing container")
            _docker(self.engine.json, "DELETE", api.query(f"/containers/{existing['Id']}", force="1"))
            result["replaced_container"] = True
        if self.restore_workdir:
            for mount in manifest.get("mounts") or []:
                self.progress.set("restoring bind mounts", mount=mount["source"])
                result["workdir_restored"].append(restore_mount(self.store, mount))
        self.progress.set("creating the container")
        result["container_id"] = self._create(manifest, result["image"])
        if self._should_start(manifest):
            self.progress.set("starting the container")
            try:
                self.engine.json("POST", f"/containers/{result['container_id']}/start", ok=(204, 304))
            except api.DockerApiError as e:
                raise BackupError(
                    f"{self.name} was restored from backup {manifest['id']} and created, but does not start: {e}"
                ) from e
            result["container_started"] = True
        result["msg"] = (
            f"restored {self.name} from backup {manifest['id']}"
            + (" (replacing the existing container)" if existing else "")
            + (", started" if result["container_started"] else "")
        )

    def _present_prefix(self, diff_ids):
        """How many of the first layers the engine already has, as the start of some image's layers."""
        best = 0
        for image in _docker(self.engine.json, "GET", "/images/json") or []:
            layers = ((_docker(self.engine.image, image["Id"]) or {}).get("RootFS") or {}).get("Layers") or []
            common = 0
            for mine, theirs in zip(diff_ids, layers):
                if mine != theirs:
                    break
                common += 1
            best = max(best, common)
            if best == len(diff_ids):
                break
        return best

    def _send(self, manifest, config_bytes, skip, repo_tag, result):
        self.progress.set("load", layers_present=skip)
        check = self.verify == "content"  # (full: checked before; stored: zstd's and the engine's checks only)
        stream = LoadTar(
            self.store,
            config_bytes,
            manifest["layers"],
            repo_tag,
            skip=skip,
            progress=self.progress,
            check_content=check,
        )

        def sent(_count, finished):
            if finished:  # the engine has the whole tar, and unpacks its layers until it answers
                self.progress.set("load: the engine unpacks the layers")

        try:
            self.engine.load(stream, sent)
        except api.DockerApiError as e:
            raise _EngineRefused(str(e)) from e
        finally:
            stream.close()
        result["verified_content_bytes"] += sum(x["size"] for x in manifest["layers"][skip:]) if check else 0
        result.update(
            image_loaded=True,
            layers_present=skip,
            layers_sent=len(manifest["layers"]) - skip,
            bytes_sent=stream.sent,
        )

    def _load_image(self, manifest, result):
        repo, tag = backup_tag(self.name, manifest["id"])
        config_bytes = manifest["image"]["config"].encode("utf-8")
        image_id = sha256_of(config_bytes)
        if _docker(self.engine.image, image_id):
            path = api.query(f"/images/{api.quoted(image_id)}/tag", repo=repo, tag=tag)
            _docker(self.engine.json, "POST", path)
            result["layers_present"] = len(manifest["layers"])
            return
        self.progress.set("finding the layers the engine has")
        skip = self._present_prefix([layer["diff_id"] for layer in manifest["layers"]])
        try:
            self._send(manifest, config_bytes, skip, f"{repo}:{tag}", result)
        except _EngineRefused as e:
            if not skip:
                raise
            self.warnings.append(f"loading with the engine's own {skip} first layers failed ({e}); sent them all")
            self._send(manifest, config_bytes, 0, f"{repo}:{tag}", result)
        loaded = _docker(self.engine.image, f"{repo}:{tag}")
        if not loaded or loaded["Id"] != image_id:
            raise BackupError(
                f"the engine loaded the image of backup {manifest['id']} but {repo}:{tag} is not {image_id}"
            )

    def _create(self, manifest, image):
        settings = manifest["run_settings"]
        body = dict(settings["config"])
        body["Image"] = image
        env = list(body.get("Env") or [])
        for key, value in sorted(self.env.items()):
            env = [e for e in env if env_name(e) != key] + [f"{key}={value}"]
        body["Env"] = env
        body["Labels"] = {**(body.get("Labels") or {}), RESTORED_LABEL: manifest["id"]}
        host_config = dict(settings["host_config"])
        body["HostConfig"] = host_config
        networks = dict(settings.get("networks") or {})
        first = host_config.get("NetworkMode") if host_config.get("NetworkMode") in networks else None
        if networks:
            first = first or sorted(networks)[0]
            body["NetworkingConfig"] = {"EndpointsConfig": {first: networks[first]}}
        created = _docker(self.engine.json, "POST", api.query("/containers/create", name=settings["name"]), body)
        for network in sorted(set(networks) - {first}):
            _docker(
                self.engine.json,
                "POST",
                f"/networks/{api.quoted(network)}/connect",
                {"Container": created["Id"], "EndpointConfig": networks[network]},
            )
        for warning in created.get("Warnings") or []:
            self.warnings.append(f"the engine: {warning}")
        return created["Id"]


# ---- the command line (the systemd timer of role backup) -------------------------------------------------------------


def list_store(store_path, container=None):
    store = Store(store_path)
    out = []
    for name in [check_name(container, "container name")] if container else store.containers():
        for manifest in store.backups_of(name):
            blobs = {b["digest"]: b for b, _ in manifest_blobs(manifest)}
            out.append(
                {
                    "container": name,
                    "backup_id": manifest["id"],
                    "created": manifest.get("created_utc"),
                    "layers": len(manifest.get("layers") or []),
                    "mounts": [m["source"] for m in manifest.get("mounts") or []],
                    "stored_bytes": sum(b["stored_size"] for b in blobs.values()),
                    "complete": not store.missing_blobs(manifest),
                }
            )
    return {"store": store.path, "backups": out, "store_bytes": store.disk_usage()}


def _parser():
    parser = argparse.ArgumentParser(
        prog="gpulab_backup.py", description="gpulab's container backups (the code of container_backup/restore)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    backup = sub.add_parser("backup", help="back up containers into the store (one JSON result per line)")
    backup.add_argument("--store", required=True)
    backup.add_argument("--container", required=True, action="append", help="repeat for several containers")
    backup.add_argument("--keep-last", type=int, default=3)
    backup.add_argument("--no-workdir", action="store_true", help="do not archive the bind-mount sources")
    backup.add_argument("--no-pause", action="store_true")
    backup.add_argument("--flatten-threshold", type=int, default=DEFAULT_FLATTEN_THRESHOLD)
    backup.add_argument("--compression-level", type=int, default=DEFAULT_LEVEL)
    backup.add_argument("--secret-env", action="append", help="name pattern of secret variables (repeat)")
    backup.add_argument("--format", choices=["store", "docker-archive"], default="store")
    backup.add_argument("--archive-path")
    backup.add_argument("--no-fast-path", action="store_true", help="always commit + save (no overlay2 upper dir read)")
    restore = sub.add_parser("restore", help="restore a container from the store")
    restore.add_argument("--store", required=True)
    restore.add_argument("--container", required=True)
    restore.add_argument("--backup")
    restore.add_argument("--force", action="store_true")
    restore.add_argument("--no-workdir", action="store_true")
    restore.add_argument("--verify-only", action="store_true")
    restore.add_argument("--verify", choices=list(VERIFY_MODES), default="content")
    restore.add_argument("--env", action="append", default=[], help="NAME=VALUE of a secret the backup left out")
    listing = sub.add_parser("list", help="list the backups in the store")
    listing.add_argument("--store", required=True)
    listing.add_argument("--container")
    for p in (backup, restore):
        p.add_argument("--docker-host", default="unix:///var/run/docker.sock")
        p.add_argument("--timeout", type=int, default=0, help="seconds per read from the engine; 0: no limit")
        p.add_argument("--progress-file")
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    failed = 0
    try:
        if args.command == "list":
            print(json.dumps(list_store(args.store, args.container), indent=1))
            return 0
        if args.command == "restore":
            env = dict(e.split("=", 1) for e in args.env if "=" in e)
            job = RestoreJob(
                store=args.store,
                container=args.container,
                backup=args.backup,
                force=args.force,
                restore_workdir=not args.no_workdir,
                verify_only=args.verify_only,
                verify=args.verify,
                env=env,
                docker_host=args.docker_host,
                timeout=args.timeout,
                progress_file=args.progress_file,
            )
            print(json.dumps(job.run(), indent=1))
            return 0
    except (BackupError, api.DockerApiError) as e:
        print(f"gpulab_backup: {e}", file=sys.stderr)
        return 1
    for container in args.container:
        try:
            job = BackupJob(
                container=container,
                store=args.store,
                keep_last=args.keep_last,
                include_workdir=not args.no_workdir,
                pause=not args.no_pause,
                fmt=args.format,
                archive_path=args.archive_path,
                flatten_threshold=args.flatten_threshold,
                secret_env=args.secret_env,
                level=args.compression_level,
                docker_host=args.docker_host,
                timeout=args.timeout,
                progress_file=args.progress_file,
                fast_path=not args.no_fast_path,
            )
            print(json.dumps(job.run(), sort_keys=True), flush=True)
        except (BackupError, api.DockerApiError) as e:
            print(f"gpulab_backup: backup of {container} failed: {e}", file=sys.stderr, flush=True)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
