# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""The store's copy on the lab's own storage (a NAS over SFTP, S3, WebDAV, ...), through rclone: the upload after a
backup, the fetch a restore needs, retention there and a scrub of it; and the command line the timers run:

    python3 -m ansible_collections.gpulab.lab.plugins.module_utils.backup.remote upload --settings FILE
    ... verify --settings FILE        (the remote scrub: every blob downloaded and its checksum checked)

Why rclone: one well-kept program, packaged by Debian and Ubuntu (rclone), speaks SFTP, S3 and every S3-compatible
service, WebDAV, SMB and dozens more with one command line, and encrypts on the client (its crypt remote); Python's
standard library speaks none of them. gpulab asks rclone only for plain file operations (lsjson, copy of a named
list of files, rcat, delete of named files, hashsum --download), always with its root-only configuration file.

Layout under the remote path (backup_remote, for example nas:gpulab), the store's own file names:
  blobs/sha256/<hex>                                 blobs, shared by every server that uses the remote
  servers/<server>/backups/<container>/<id>.json     each server's manifests, in its own folder
  locks/<upload|prune>-<server>-<unix time>-<random> an upload or a retention run in progress
  quarantine/sha256/<hex>                            blobs the scrub found damaged, moved out of blobs/
Blobs are uploaded before the manifests that name them (a manifest on the remote never names a blob the remote
lacks); files already there with their size are not sent again; nothing is removed but by retention (prune), which
removes a blob only when no manifest of any server names it and no upload of any server is running (its lock).

Talks to no engine and never changes the local store but to add fetched blobs and manifests (checked first).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import NamedTuple

from ansible_collections.gpulab.lab.plugins.module_utils.backup.cli import err, out
from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import (
    BackupError,
    check_name,
    os_error_text,
    size_text,
)
from ansible_collections.gpulab.lab.plugins.module_utils.backup.store import Store, manifest_blobs
from ansible_collections.gpulab.lab.plugins.module_utils.files import file_sha256, find_program, fsync_dir

PROG = "python3 -m ansible_collections.gpulab.lab.plugins.module_utils.backup.remote"
BLOBS = "blobs/sha256"
SERVERS = "servers"
LOCKS = "locks"
QUARANTINE = "quarantine/sha256"
# A lock older than this is a killed run's: an upload or a prune takes far less (an upload's lock is older only when
# its server was cut off for a day, and then its next upload uploads whatever retention removed).
LOCK_STALE = 24 * 3600
LOCK_WAIT = 600  # seconds an upload waits for another server's retention run to end
CRYPT_SECTION = "gpulab-crypt"


class RemoteError(BackupError):
    """rclone failed, or the remote holds something gpulab refuses."""


class Settings(NamedTuple):
    """What every remote operation needs: the rclone path to use (the crypt remote's when encrypted), the shown name
    (backup_remote), the configuration file, this server's folder name, the local store and backup_keep_last."""

    remote: str
    config: str
    server: str
    store: str
    keep_last: int = 3
    shown: str = ""

    @classmethod
    def load(cls, path):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise BackupError(f"the remote's settings {path} cannot be read: {e}") from e
        fields = {k: data[k] for k in cls._fields if k in data}
        missing = [k for k in ("remote", "config", "server", "store") if k not in fields]
        if missing:
            raise BackupError(f"the remote's settings {path} lack {', '.join(missing)}")
        return cls(**fields)

    @property
    def name(self):
        return self.shown or self.remote


class Uploaded(NamedTuple):
    blobs: int
    bytes: int
    blobs_there: int
    manifests: int
    manifests_there: int
    seconds: float
    warnings: list


class Pruned(NamedTuple):
    manifests: list
    blobs: int
    bytes: int
    warnings: list


class Fetched(NamedTuple):
    """A backup fetched: its blobs and bytes fetched, the blobs the store had; new: the store lacked it; notices:
    quarantined blobs of the store that the fetch healed."""

    container: str
    backup_id: str
    blobs: int
    bytes: int
    blobs_local: int
    new: bool = True
    notices: tuple = ()


class Scrubbed(NamedTuple):
    blobs: int
    bytes: int
    problems: list
    unreferenced: int
    seconds: float


class Rclone:
    """rclone with gpulab's configuration file only (never ~/.config), on the path `remote` (remote:path)."""

    def __init__(self, settings):
        self.settings = settings
        self.program = find_program("rclone")
        if not self.program:
            raise RemoteError(
                "rclone is not installed on this server (Debian's package rclone; role backup installs it)"
            )
        self.base = settings.remote.rstrip("/") if not settings.remote.endswith(":") else settings.remote

    def path(self, *parts):
        sep = "" if self.base.endswith(":") else "/"
        return self.base + sep + "/".join(p.strip("/") for p in parts if p)

    def run(self, *args, data=None, check=True):
        command = [self.program, "--config", self.settings.config, "--retries", "3", *args]
        try:
            proc = subprocess.run(command, input=data, capture_output=True, check=False)
        except OSError as e:
            raise RemoteError(f"rclone cannot be run: {os_error_text(e)}") from e
        if check and proc.returncode != 0:
            raise RemoteError(f"rclone {args[0]} on {self.settings.name} failed: {tail(proc.stderr)}")
        return proc

    def files(self, *parts):
        """{relative path: size} of the files below a folder of the remote; {} when the folder does not exist."""
        proc = self.run("lsjson", "-R", "--files-only", "--no-mimetype", self.path(*parts), check=False)
        if proc.returncode == 3 or (proc.returncode != 0 and b"directory not found" in proc.stderr):
            return {}
        if proc.returncode != 0:
            raise RemoteError(f"rclone cannot list {self.path(*parts)}: {tail(proc.stderr)}")
        return {e["Path"]: e["Size"] for e in json.loads(proc.stdout or b"[]")}

    def copy(self, source, dest, names):
        """Copy the files `names` (paths relative to source) from source to dest, whether dest has them or not."""
        if not names:
            return
        with tempfile.NamedTemporaryFile("w", prefix="gpulab-rclone-", suffix=".list") as listing:
            listing.write("".join(n + "\n" for n in names))
            listing.flush()
            self.run("copy", "--files-from-raw", listing.name, "--no-traverse", "--ignore-times", source, dest)

    def delete(self, parts, names):
        if not names:
            return
        with tempfile.NamedTemporaryFile("w", prefix="gpulab-rclone-", suffix=".list") as listing:
            listing.write("".join(n + "\n" for n in names))
            listing.flush()
            self.run("delete", "--files-from-raw", listing.name, self.path(*parts))

    def put(self, data, *parts):
        self.run("rcat", self.path(*parts), data=data)

    def remove(self, *parts):
        self.run("deletefile", self.path(*parts), check=False)


def tail(stderr, lines=3):
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    found = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in found if "ERROR" in line or "Failed" in line] or found
    return " | ".join(errors[-lines:]) or "no message"


# ---- locks on the remote: an upload and a retention run see each other -----------------------------------------


class Lock(NamedTuple):
    kind: str
    server: str
    created: int
    name: str


def read_locks(rclone):
    locks = []
    for name in rclone.files(LOCKS):
        kind, _sep, rest = name.partition("-")
        server, _sep, stamp = rest.rpartition("-")[0].rpartition("-")
        with contextlib.suppress(ValueError):
            locks.append(Lock(kind, server, int(stamp), name))
    return locks


@contextlib.contextmanager
def remote_lock(rclone, kind):
    """Write this run's lock, then yield the other runs' live locks (written before ours was listed). Two runs that
    write theirs at once each see the other's, so retention and an upload never both miss each other."""
    server = rclone.settings.server
    mine = f"{kind}-{server}-{int(time.time())}-{os.urandom(4).hex()}"
    rclone.put(json.dumps({"kind": kind, "server": server, "pid": os.getpid()}).encode(), LOCKS, mine)
    try:
        now = time.time()
        others = [lk for lk in read_locks(rclone) if lk.name != mine and now - lk.created < LOCK_STALE]
        yield others
    finally:
        rclone.remove(LOCKS, mine)


def clear_own_locks(rclone):
    """Locks of this server left by a killed run (one remote operation runs at a time on a server: local_lock)."""
    for lock in read_locks(rclone):
        if lock.server == rclone.settings.server:
            rclone.remove(LOCKS, lock.name)


@contextlib.contextmanager
def local_lock(settings):
    """One remote operation at a time on this server (the play's and the timer's): flock on the config file."""
    try:
        fd = os.open(settings.config, os.O_RDONLY)
    except OSError as e:
        raise RemoteError(f"the remote's configuration cannot be read: {os_error_text(e)}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ---- what the store and the remote hold --------------------------------------------------------------------------


def local_manifests(store):
    """(relative path under backups/, manifest, its file size) of every readable manifest of the store; and the
    warnings for those that cannot be read."""
    found, warnings = [], []
    for container in store.containers():
        for backup_id in store.backup_ids(container):
            path = store.manifest_path(container, backup_id)
            try:
                manifest = store.read_manifest(container, backup_id)
                found.append((f"{container}/{backup_id}.json", manifest, os.path.getsize(path)))
            except (BackupError, OSError) as e:
                warnings.append(f"not uploaded: {e}")
    return found, warnings


def blob_name(digest):
    return digest[len("sha256:") :]


def download_manifests(rclone, folder, only_server=None):
    """Every manifest on the remote (of one server, or of all) copied into folder; returns
    {(server, container, id): manifest or the reason it cannot be read}."""
    listed = rclone.files(SERVERS)
    names = [
        p
        for p in listed
        if p.endswith(".json") and p.count("/") == 3 and p.split("/")[1] == "backups"
        if only_server is None or p.split("/")[0] == only_server
    ]
    with contextlib.suppress(RemoteError):  # one that cannot be read is named below; the others are read
        rclone.copy(rclone.path(SERVERS), folder, names)
    out = {}
    for name in names:
        server, _backups, container, file_name = name.split("/")
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                manifest = json.load(f)
            if not isinstance(manifest, dict) or not isinstance(manifest.get("layers", []), list):
                raise ValueError("not a gpulab backup manifest")
            out[(server, container, file_name[: -len(".json")])] = manifest
        except (OSError, ValueError) as e:
            out[(server, container, file_name[: -len(".json")])] = f"{SERVERS}/{name} cannot be read: {e}"
    return out


# ---- upload --------------------------------------------------------------------------------------------------------


def upload(settings, check_mode=False):
    """Copy to the remote the blobs of the store's manifests that it lacks (or holds with another size: a killed
    upload's), then the manifests it lacks. Returns Uploaded; raises RemoteError when the copy is incomplete."""
    start = time.monotonic()
    if check_mode and not os.path.isdir(settings.store):
        return Uploaded(0, 0, 0, 0, 0, 0.0, [f"the store {settings.store} does not exist yet: nothing to upload"])
    store = Store(settings.store)
    rclone = Rclone(settings)
    with local_lock(settings), store.lock(exclusive=False):
        manifests, warnings = local_manifests(store)
        local, quarantined = {}, store.quarantined()
        for _name, manifest, _size in manifests:
            for blob, _what in manifest_blobs(manifest):
                if store.usable(blob, quarantined):  # a blob found corrupt here is never sent
                    local[blob_name(blob["digest"])] = blob["stored_size"]
        if check_mode:
            return _plan_upload(rclone, local, manifests, warnings, start)
        clear_own_locks(rclone)
        with remote_lock(rclone, "upload") as others:
            _wait_for_prunes(rclone, others)
            there = rclone.files(BLOBS)
            send = sorted(n for n, size in local.items() if there.get(n) != size)
            try:
                rclone.copy(store.blobs, rclone.path(BLOBS), send)
            except RemoteError as e:
                raise RemoteError(
                    f"{e}. The copy on {settings.name} is incomplete (its manifests were not uploaded); the local "
                    "backups are intact and the next upload sends what is missing"
                ) from None
            on_remote = {n for n, size in there.items() if local.get(n, size) == size} | set(send)
            theirs = rclone.files(SERVERS, settings.server, "backups")
            to_send, ready = [], 0
            for name, manifest, size in manifests:
                if theirs.get(name) == size:
                    ready += 1
                elif all(blob_name(b["digest"]) in on_remote for b, _w in manifest_blobs(manifest)):
                    to_send.append(name)
                else:
                    warnings.append(f"{name} not uploaded: the store lacks some of its blobs")
            try:
                rclone.copy(store.backups, rclone.path(SERVERS, settings.server, "backups"), to_send)
            except RemoteError as e:
                raise RemoteError(
                    f"{e}. The copy on {settings.name} is incomplete (some manifests are missing there); the local "
                    "backups are intact and the next upload sends what is missing"
                ) from None
    sent = sum(local[n] for n in send)
    return Uploaded(len(send), sent, len(local) - len(send), len(to_send), ready, _since(start), warnings)


def _plan_upload(rclone, local, manifests, warnings, start):
    there = rclone.files(BLOBS)
    send = [n for n, size in local.items() if there.get(n) != size]
    theirs = rclone.files(SERVERS, rclone.settings.server, "backups")
    manifests_new = [name for name, _m, size in manifests if theirs.get(name) != size]
    return Uploaded(
        len(send),
        sum(local[n] for n in send),
        len(local) - len(send),
        len(manifests_new),
        len(manifests) - len(manifests_new),
        _since(start),
        warnings,
    )


def _wait_for_prunes(rclone, others):
    """A retention run that started before this upload's lock was written may remove blobs this upload finds there:
    wait until it ended."""
    deadline = time.monotonic() + LOCK_WAIT
    prunes = [lk for lk in others if lk.kind == "prune"]
    while prunes:
        if time.monotonic() > deadline:
            raise RemoteError(
                f"retention on {rclone.settings.name} by {', '.join(lk.server for lk in prunes)} has not ended in "
                f"{LOCK_WAIT} s; nothing was uploaded (the next backup tries again). A lock of a killed run is "
                f"ignored after {LOCK_STALE // 3600} h: {LOCKS}/{prunes[0].name}"
            )
        time.sleep(2)
        live = {lk.name for lk in read_locks(rclone)}
        prunes = [lk for lk in prunes if lk.name in live]


def _since(start):
    return round(time.monotonic() - start, 2)


# ---- retention -----------------------------------------------------------------------------------------------------


def prune(settings, check_mode=False):
    """backup_keep_last on the remote for this server's containers (the newest backups by id, and the newest one the
    remote holds every blob of), then the blobs that no manifest of any server names, unless an upload of any server
    runs (its lock): its blobs are on the remote before its manifests are. Returns Pruned."""
    rclone = Rclone(settings)
    warnings = []
    with local_lock(settings), tempfile.TemporaryDirectory(prefix="gpulab-remote-") as folder:
        lock = contextlib.nullcontext([]) if check_mode else remote_lock(rclone, "prune")
        with lock as others:
            manifests = download_manifests(rclone, folder)
            blobs = rclone.files(BLOBS)
            removed = _old_manifests(settings, manifests, blobs)
            if removed and not check_mode:
                rclone.delete((SERVERS, settings.server, "backups"), [f"{c}/{i}.json" for _s, c, i in removed])
            for key in removed:
                manifests.pop(key)
            unreadable = [m for m in manifests.values() if isinstance(m, str)]
            uploads = [lk for lk in others if lk.kind == "upload"]
            if unreadable:
                warnings.append(f"no blob was removed from {settings.name}: {unreadable[0]}")
                return Pruned([f"{c}/{i}" for _s, c, i in removed], 0, 0, warnings)
            if uploads:
                warnings.append(
                    f"no blob was removed from {settings.name}: an upload by {uploads[0].server} runs (lock "
                    f"{LOCKS}/{uploads[0].name}); the next backup's retention removes them"
                )
                return Pruned([f"{c}/{i}" for _s, c, i in removed], 0, 0, warnings)
            needed = {blob_name(b["digest"]) for m in manifests.values() for b, _w in manifest_blobs(m)}
            garbage = sorted(n for n in blobs if n not in needed)
            if garbage and not check_mode:
                rclone.delete((BLOBS,), garbage)
    return Pruned([f"{c}/{i}" for _s, c, i in removed], len(garbage), sum(blobs[n] for n in garbage), warnings)


def _old_manifests(settings, manifests, blobs):
    """Keys of this server's manifests beyond keep_last per container; the newest whose blobs are all on the remote
    is always kept."""
    removed = []
    containers = sorted({c for s, c, _i in manifests if s == settings.server})
    for container in containers:
        ids = sorted(i for s, c, i in manifests if s == settings.server and c == container)
        keep = set(ids[-max(1, settings.keep_last) :])
        complete = [
            i
            for i in ids
            if not isinstance(m := manifests[(settings.server, container, i)], str)
            and all(blobs.get(blob_name(b["digest"])) == b["stored_size"] for b, _w in manifest_blobs(m))
        ]
        if complete:
            keep.add(complete[-1])
        removed += [(settings.server, container, i) for i in ids if i not in keep]
    return removed


# ---- fetch for a restore -------------------------------------------------------------------------------------------


def remote_containers(settings):
    """The containers this server has backups of on the remote."""
    return sorted({p.split("/")[0] for p in Rclone(settings).files(SERVERS, settings.server, "backups") if "/" in p})


class FetchResult(NamedTuple):
    """The backups fetched (Fetched), and the containers asked for that this server has no backup of on the remote."""

    fetched: list
    absent: list


def fetch(settings, containers=(), backup_id="", check_mode=False):
    """Bring into the store the manifest to restore of each container (backup_id, else its newest on the remote) and
    the blobs of it the store lacks, each checked (size and sha256 of the stored file) before it is put in place,
    the manifest last. A blob damaged on the remote is refused by its name and nothing of it is kept. A container
    the remote has no backup of is left to the restore (a new lab's first run has none anywhere), named in absent;
    a backup_id the remote lacks is an error. Returns FetchResult."""
    rclone = Rclone(settings)
    listed = rclone.files(SERVERS, settings.server, "backups")
    names = [check_name(c, "container name") for c in containers] or sorted({p.split("/")[0] for p in listed})
    ids_of = {n: sorted(p.split("/")[1][: -len(".json")] for p in listed if p.startswith(n + "/")) for n in names}
    absent = [n for n in names if not ids_of[n]]
    if backup_id and absent:
        raise RemoteError(
            f"{settings.name} holds no backup of {', '.join(absent)} from {settings.server}. Nothing was changed."
        )
    store = Store(settings.store, create=True)
    if not check_mode and len(absent) < len(names):
        store.create()
    out = []
    with local_lock(settings), contextlib.ExitStack() as stack:
        if not check_mode and len(absent) < len(names):
            stack.enter_context(store.lock(exclusive=True))
        for container in names:
            ids = ids_of[container]
            if not ids:
                continue
            wanted = backup_id or ids[-1]
            if wanted not in ids:
                raise RemoteError(
                    f"{settings.name} has no backup {wanted} of {container} from {settings.server} (it has: "
                    f"{', '.join(reversed(ids))}). Nothing was changed."
                )
            out.append(_fetch_one(rclone, store, container, wanted, ids=ids, check_mode=check_mode))
    return FetchResult(out, absent)


def _fetch_one(rclone, store, container, backup_id, *, ids, check_mode):
    settings = rclone.settings
    quarantined = store.quarantined() if os.path.isdir(store.path) else {}
    with contextlib.suppress(BackupError):
        have = store.read_manifest(container, backup_id)
        if not store.missing_blobs(have, quarantined):
            return Fetched(container, backup_id, 0, 0, len({b["digest"] for b, _w in manifest_blobs(have)}), False)
    staging = tempfile.mkdtemp(prefix="remote-fetch-", dir=store.tmp if os.path.isdir(store.tmp) else None)
    try:
        name = f"{container}/{backup_id}.json"
        rclone.copy(rclone.path(SERVERS, settings.server, "backups"), staging, [name])
        try:
            with open(os.path.join(staging, name), encoding="utf-8") as f:
                manifest = json.load(f)
            if manifest.get("id") != backup_id or manifest.get("container") != container:
                raise ValueError("it names another backup")
        except (OSError, ValueError, AttributeError) as e:
            others = ", ".join(i for i in reversed(ids) if i != backup_id) or "none"
            raise RemoteError(
                f"the manifest {SERVERS}/{settings.server}/backups/{name} on {settings.name} cannot be read ({e}): "
                f"backup {backup_id} of {container} cannot be restored. Nothing was changed. Other backups of "
                f"{container} there: {others}; ask for one with -e backup_restore_id=<id> and backup_containers="
                f"[{container}]"
            ) from None
        needed = {}
        for blob, what in manifest_blobs(manifest):
            if not store.usable(blob, quarantined):
                needed.setdefault(blob_name(blob["digest"]), (blob, what))
        size = sum(blob["stored_size"] for blob, _w in needed.values())
        local = len({b["digest"] for b, _w in manifest_blobs(manifest)}) - len(needed)
        if check_mode:
            return Fetched(container, backup_id, len(needed), size, local)
        folder = os.path.join(staging, "blobs")
        os.makedirs(folder, exist_ok=True)
        try:
            rclone.copy(rclone.path(BLOBS), folder, sorted(needed))
        except RemoteError as e:
            _check_fetched(settings, manifest, folder, needed, e)
        _check_fetched(settings, manifest, folder, needed, None)
        # Written now, as far as the store can tell (rclone keeps the remote's times): a quarantined blob fetched
        # again is healed (Store.heal reads a blob written after it was found as stored again), and the manifest is
        # the store's newest.
        for hex_name in sorted(needed):
            os.utime(os.path.join(folder, hex_name))
            os.rename(os.path.join(folder, hex_name), os.path.join(store.blobs, hex_name))
        if needed:
            fsync_dir(store.blobs)
        manifest_folder = os.path.join(store.backups, container)
        os.makedirs(manifest_folder, mode=0o700, exist_ok=True)
        os.utime(os.path.join(staging, name))
        store.commit_file(os.path.join(staging, name), store.manifest_path(container, backup_id))
        healed = store.heal(container) if quarantined else []
        return Fetched(container, backup_id, len(needed), size, local, True, healed)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_fetched(settings, manifest, folder, needed, copy_error):
    """Refuse the fetch, naming each blob that did not arrive or whose stored sha256 is not the manifest's."""
    bad = []
    for hex_name, (blob, what) in sorted(needed.items()):
        path = os.path.join(folder, hex_name)
        if not os.path.exists(path):
            bad.append(f"{what}: blob {blob['digest']} could not be read from {settings.name}")
        elif file_sha256(path) != blob["stored_digest"]:
            bad.append(f"{what}: blob {blob['digest']} is damaged on {settings.name} (its checksum differs)")
    if bad or copy_error:
        detail = f" (rclone: {copy_error})" if copy_error else ""
        raise RemoteError(
            f"backup {manifest['id']} of {manifest['container']} on {settings.name} is damaged; nothing was changed: "
            + "; ".join(bad or ["the copy failed"])
            + detail
        )


# ---- the remote scrub ----------------------------------------------------------------------------------------------


def scrub(settings, check_mode=False):
    """Download every blob a manifest on the remote names (of every server) and check the sha256 of what the remote
    holds against the manifests' (rclone hashsum --download: the bytes as they come back, decrypted with crypt). A
    blob whose bytes differ, or that cannot be read twice in a row (a damaged encrypted file), is moved to
    quarantine/sha256/ on the remote (unless check_mode), so that the next upload of a server that still has it sends
    it again. Returns Scrubbed; problems name the blob and the backups that need it."""
    start = time.monotonic()
    rclone = Rclone(settings)
    with tempfile.TemporaryDirectory(prefix="gpulab-remote-") as folder:
        manifests = download_manifests(rclone, folder)
    problems = [m for m in manifests.values() if isinstance(m, str)]
    wanted, users = {}, {}
    for (server, container, backup_id), manifest in sorted(manifests.items(), key=lambda kv: kv[0]):
        if isinstance(manifest, str):
            continue
        for blob, _what in manifest_blobs(manifest):
            wanted[blob_name(blob["digest"])] = blob
            users.setdefault(blob_name(blob["digest"]), []).append(f"{server}/{container}/{backup_id}")
    present = rclone.files(BLOBS)
    sums = _hashsums(rclone)
    unread = sorted(n for n in wanted if n in present and n not in sums)
    if unread:  # once more, alone: a read that failed for a moment is no damage
        sums.update(_hashsums(rclone, unread))
    damaged = []
    for name, blob in sorted(wanted.items()):
        need = ", ".join(users[name][:3]) + (f" and {len(users[name]) - 3} more" if len(users[name]) > 3 else "")
        got = sums.get(name)
        if name not in present:
            problems.append(f"blob sha256:{name} is missing on {settings.name} (needed by {need})")
        elif got is None or "sha256:" + got != blob["stored_digest"]:
            how = "cannot be read (damaged)" if got is None else "is damaged (its checksum differs)"
            problems.append(f"blob sha256:{name} {how} on {settings.name} (needed by {need})")
            damaged.append(name)
    if damaged and not check_mode:
        with tempfile.NamedTemporaryFile("w", prefix="gpulab-rclone-", suffix=".list") as listing:
            listing.write("".join(n + "\n" for n in damaged))
            listing.flush()
            rclone.run("move", "--files-from-raw", listing.name, rclone.path(BLOBS), rclone.path(QUARANTINE))
        problems.append(
            f"{len(damaged)} damaged blob(s) moved to {QUARANTINE}/ on {settings.name}: the next upload of a server "
            "that still has them sends them again"
        )
    return Scrubbed(
        len(wanted),
        sum(b["stored_size"] for b in wanted.values()),
        problems,
        len([n for n in present if n not in wanted]),
        _since(start),
    )


def _hashsums(rclone, names=()):
    """{name: sha256 hex} of the blobs on the remote (or of `names`), downloaded; a blob that cannot be read is left
    out."""
    args = ["hashsum", "sha256", "--download", rclone.path(BLOBS)]
    with contextlib.ExitStack() as stack:
        if names:
            listing = stack.enter_context(tempfile.NamedTemporaryFile("w", prefix="gpulab-rclone-", suffix=".list"))
            listing.write("".join(n + "\n" for n in names))
            listing.flush()
            args[3:3] = ["--files-from-raw", listing.name]
        proc = rclone.run(*args, check=False)
    sums = {}
    for line in proc.stdout.decode(errors="replace").splitlines():
        digest, _sep, name = line.strip().partition("  ")
        if name and len(digest) == 64:
            sums[name.strip()] = digest
    return sums


# ---- the configuration file ----------------------------------------------------------------------------------------


def config_text(config, remote, *, crypt_password="", crypt_salt="", current="", obscure=None):
    """The rclone.conf gpulab writes: the admin's text, and with a crypt password a [gpulab-crypt] section over
    `remote`. Its obscured passwords are kept from `current` while the password and salt are the same (rclone
    obscures with a random IV: a new one each run would rewrite the file every time). Returns (text, crypt path)."""
    body = config.strip() + "\n"
    if f"[{CRYPT_SECTION}]" in body:
        raise BackupError(f"backup_remote_config must not have a section [{CRYPT_SECTION}]: gpulab writes that one")
    if not crypt_password:
        return body, remote
    stamp = "# gpulab crypt key: " + text_sha256(crypt_password + "\0" + crypt_salt)
    kept = _kept_crypt(current, stamp)
    if kept is None:
        obscure = obscure or _obscure
        kept = {"password": obscure(crypt_password)}
        if crypt_salt:
            kept["password2"] = obscure(crypt_salt)
    lines = [stamp, f"[{CRYPT_SECTION}]", "type = crypt", f"remote = {remote}"]
    lines += [f"{key} = {value}" for key, value in sorted(kept.items())]
    lines += ["filename_encryption = standard", "directory_name_encryption = true"]
    return body + "\n" + "\n".join(lines) + "\n", CRYPT_SECTION + ":"


def text_sha256(text):
    return hashlib.sha256(text.encode()).hexdigest()


def _kept_crypt(current, stamp):
    if stamp not in current:
        return None
    section = current.split(stamp, 1)[1]
    kept = {}
    for line in section.splitlines():
        key, sep, value = line.partition(" = ")
        if sep and key in ("password", "password2"):
            kept[key] = value.strip()
    return kept if "password" in kept else None


def _obscure(secret):
    program = find_program("rclone")
    if not program:
        raise RemoteError("rclone is not installed on this server (Debian's package rclone)")
    proc = subprocess.run([program, "obscure", "-"], input=secret.encode(), capture_output=True, check=False)
    if proc.returncode != 0:
        raise RemoteError(f"rclone obscure failed: {tail(proc.stderr)}")
    return proc.stdout.decode().strip()


def write_config(path, text, check_mode=False):
    """Write the configuration root-only (0600) when it differs; returns whether it changed."""
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text and (os.stat(path).st_mode & 0o777) == 0o600:
                return False
    except FileNotFoundError:
        pass
    if check_mode:
        return True
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".rclone-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.rename(tmp, path)
        fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True


def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return ""


# ---- the command line ----------------------------------------------------------------------------------------------


def upload_line(settings, uploaded, pruned):
    line = (
        f"copy on {settings.name}: {uploaded.blobs} blob(s) uploaded ({size_text(uploaded.bytes)}), "
        f"{uploaded.blobs_there} already there; {uploaded.manifests} manifest(s) uploaded, "
        f"{uploaded.manifests_there} already there; in {uploaded.seconds} s"
    )
    if pruned is not None:
        line += (
            f"; retention removed {len(pruned.manifests)} backup(s) and {pruned.blobs} blob(s) "
            f"({size_text(pruned.bytes)})"
        )
    return line


def main(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description="gpulab's store copy on a remote, through rclone")
    parser.add_argument("command", choices=("upload", "verify", "prune", "list"))
    parser.add_argument("--settings", required=True, help="the JSON settings file role backup writes")
    args = parser.parse_args(argv)
    try:
        settings = Settings.load(args.settings)
        if args.command == "list":
            out(json.dumps(remote_containers(settings)))
            return 0
        if args.command == "verify":
            result = scrub(settings)
            out(json.dumps(result._asdict(), sort_keys=True))
            for problem in result.problems:
                err(problem)
            if result.problems:
                err(
                    f"the copy on {settings.name} is damaged: {len(result.problems)} problem(s), {result.blobs} blob(s)"
                )
                return 1
            return 0
        uploaded = upload(settings) if args.command == "upload" else None
        pruned = prune(settings)
        if uploaded is not None:
            out(json.dumps(uploaded._asdict(), sort_keys=True))
            out(upload_line(settings, uploaded, pruned))
        out(json.dumps({"pruned": pruned._asdict()}, sort_keys=True))
        for warning in (uploaded.warnings if uploaded else []) + pruned.warnings:
            err(warning)
        return 0
    except BackupError as e:
        err(str(e))
    except OSError as e:
        err(os_error_text(e))
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
