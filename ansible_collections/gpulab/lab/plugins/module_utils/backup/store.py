# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""The content-addressed backup store in a folder of the server: its layout, its lock, blob paths and indexes,
manifests (read, written atomically, picked for a restore) and retention.

The store (for example /var/backups/gpulab), root's only (mode 0700):
  blobs/sha256/<hex>                 a blob: zstd-compressed, named by the sha256 of its uncompressed content
  backups/<container>/<id>.json      a backup's manifest, written last: a backup without one does not exist
  tmp/                               temporary files while a blob or manifest is written; removed by the next run
  quarantine/sha256/<hex>            a blob found corrupt (by the scrub, a restore's verification or a backup), moved
  quarantine/sha256/<hex>.json       out of blobs/, and why: when, by what, which backups lacked it (Quarantined)
  scrub/                             the scrub's state: when each blob was last verified (scrub.py)
  lock                               flock: one backup at a time (exclusive), restores and the scrub share it
Every blob and manifest is written to tmp/, fsynced, renamed into place and its folder fsynced, so a killed backup
leaves at worst files in tmp/ and blobs no manifest references, both removed by the next backup.

Whether a blob can be used (Store.usable: in blobs/ with its stored size, not quarantined) is asked in one place, by
missing_blobs, blob_index and layer_index, which every reuse goes through: a quarantined blob is absent, so no new
manifest references it, and the next backup whose source still has the content stores it again (retention() then
says so and ends the quarantine: heal()).

Manifests and their blob, layer and mount entries are JSON documents (the store's format) and stay dicts here.
Compresses nothing (blobs.py writes blobs) and never talks to Docker.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from typing import NamedTuple

from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import (
    DIGEST_RE,
    FORMAT,
    FORMAT_VERSION,
    NAME_RE,
    BackupError,
    check_name,
    now_utc,
)
from ansible_collections.gpulab.lab.plugins.module_utils.files import fsync_dir


class Retention(NamedTuple):
    """What retention removed: backup ids, blob digests, bytes freed, and warnings."""

    removed: list
    blobs: list
    freed: int
    warnings: list


class Picked(NamedTuple):
    """The manifest a restore takes, and warnings about older backups that are damaged."""

    manifest: dict
    warnings: list


class Listed(NamedTuple):
    """A backup as the store lists it: its id, its manifest (None when the file cannot be read) or why not, and the
    manifest file's modification time."""

    id: str
    manifest: dict | None
    problem: str | None
    mtime_ns: int


class Quarantined(NamedTuple):
    """A blob moved to quarantine: its digest, why, by what (scrub, restore, backup), when (UTC, and unix time), the
    backups that referenced it then ((container, id, what) each), and, once a backup stored its content again, when
    and by which backup."""

    digest: str
    why: str
    found_by: str
    found_utc: str
    backups: list
    found_at: float = 0.0
    healed_utc: str | None = None
    healed_by: str | None = None

    def text(self):
        return f"quarantined: {self.why}, found by the {self.found_by} at {self.found_utc}"


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
        self.quarantine_dir = os.path.join(self.path, "quarantine", "sha256")
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

    # usable blobs: the one gate of every reuse, and the quarantine

    def usable(self, blob, quarantined):
        """Whether a manifest's blob entry can be used: its file is in blobs/ with the stored size, and it is not in
        quarantine (quarantined: Store.quarantined(), asked once by the caller)."""
        return blob["digest"] not in quarantined and self.blob_size(blob["digest"]) == blob["stored_size"]

    def missing_blobs(self, manifest, quarantined=None):
        """(digest, what) of the blobs of a manifest that cannot be used: quarantined, missing, or of the wrong size
        on disk."""
        quarantined = self.quarantined() if quarantined is None else quarantined
        problems = []
        for blob, what in manifest_blobs(manifest):
            digest = blob["digest"]
            if self.usable(blob, quarantined):
                continue
            size = self.blob_size(digest)
            if digest in quarantined:
                problems.append((digest, f"{what}: blob {digest} is damaged ({quarantined[digest].text()})"))
            elif size is None:
                problems.append((digest, f"{what}: blob {digest} is missing"))
            else:
                problems.append((digest, f"{what}: blob {digest} has {size} bytes, not {blob['stored_size']}"))
        return problems

    def _readable_manifests(self):
        """Every manifest of the store that can be read (one that cannot is passed over)."""
        for container in self.containers():
            for backup_id in self.backup_ids(container):
                with contextlib.suppress(BackupError):
                    yield self.read_manifest(container, backup_id)

    def blob_index(self):
        """Blobs that manifests describe and that can be used (Store.usable): digest -> blob entry."""
        index, quarantined = {}, self.quarantined()
        for manifest in self._readable_manifests():
            for blob, _what in manifest_blobs(manifest):
                if blob["digest"] not in index and self.usable(blob, quarantined):
                    index[blob["digest"]] = dict(blob)
        return index

    def layer_index(self):
        """Layers that manifests describe and whose blobs can all be used (Store.usable): diff_id -> layer entry (a
        layer is a list of blobs: one from docker save, content-defined chunks from an upper directory)."""
        index, quarantined = {}, self.quarantined()
        for manifest in self._readable_manifests():
            for layer in manifest.get("layers") or []:
                blobs = layer.get("blobs") or []
                if layer["diff_id"] not in index and all(self.usable(b, quarantined) for b in blobs):
                    index[layer["diff_id"]] = {"diff_id": layer["diff_id"], "size": layer["size"], "blobs": blobs}
        return index

    def _quarantine_record(self, digest):
        return self.quarantine_copy(digest) + ".json"

    def quarantine_copy(self, digest):
        """Where the bad file of a quarantined blob is kept (for a look at it; never read by gpulab)."""
        return os.path.join(self.quarantine_dir, self.blob_path(digest).rsplit("/", 1)[1])

    def quarantine_records(self):
        """Every quarantine record, healed or not: digest -> Quarantined."""
        records = {}
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(self.quarantine_dir)):
                if not name.endswith(".json") or not DIGEST_RE.match("sha256:" + name[: -len(".json")]):
                    continue
                with contextlib.suppress(OSError, ValueError, TypeError):
                    with open(os.path.join(self.quarantine_dir, name), encoding="utf-8") as f:
                        record = Quarantined(**json.load(f))
                    records[record.digest] = record
        return records

    def quarantined(self):
        """The blobs in quarantine now (not stored again since): digest -> Quarantined."""
        return {d: r for d, r in self.quarantine_records().items() if r.healed_utc is None}

    def _write_record(self, record):
        os.makedirs(self.quarantine_dir, mode=0o700, exist_ok=True)
        write_json(self._quarantine_record(record.digest), record._asdict())

    def referencing(self, digest):
        """(container, backup id, what) of every readable backup that references a blob."""
        return [
            (m["container"], m["id"], what)
            for m in self._readable_manifests()
            for blob, what in manifest_blobs(m)
            if blob["digest"] == digest
        ]

    def quarantine(self, digest, why, found_by):
        """Move a blob found corrupt out of blobs/ into quarantine/, with its record written first (a run killed in
        between leaves a record whose blob is still in blobs/: quarantined all the same, as usable() reads the record).
        Call with the store's lock held, shared at least (no backup runs). Returns the Quarantined record."""
        record = Quarantined(
            digest, why, found_by, now_utc(), [list(r) for r in self.referencing(digest)], found_at=time.time()
        )
        self._write_record(record)
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.blob_path(digest), self.quarantine_copy(digest))
            fsync_dir(self.blobs)
        return record

    def quarantine_misfits(self, found_by="backup"):
        """Quarantine the blobs in blobs/ whose size differs from the one every manifest records for them (a file cut
        short or grown). Returns the Quarantined records."""
        sizes, quarantined = {}, self.quarantined()
        for manifest in self._readable_manifests():
            for blob, _what in manifest_blobs(manifest):
                sizes.setdefault(blob["digest"], set()).add(blob["stored_size"])
        out = []
        for digest, stored in sorted(sizes.items()):
            size = self.blob_size(digest)
            if size is not None and size not in stored and digest not in quarantined:
                why = f"its file has {size} bytes, not {' or '.join(str(s) for s in sorted(stored))}"
                out.append(self.quarantine(digest, why, found_by))
        return out

    def _whose(self, record):
        """What a healed blob gave back: the backups that lacked it and are complete again, and those still not."""
        again, still = [], []
        for container, backup_id, _what in record.backups:
            with contextlib.suppress(BackupError):
                manifest = self.read_manifest(container, backup_id)
                (still if self.missing_blobs(manifest) else again).append(f"{container} {backup_id}")
        return (f"; complete again: {', '.join(sorted(set(again)))}" if again else "") + (
            f"; still damaged: {', '.join(sorted(set(still)))}" if still else ""
        )

    def heal(self, container):
        """After a backup of container: the quarantined blobs that a backup stored again (their file is back in
        blobs/, written from the source) leave quarantine, and the bad copy is removed. Returns the warnings that say
        so, and those that name the backups of container still damaged. Call with the exclusive lock held."""
        quarantined = self.quarantined()
        if not quarantined:
            return []
        newest = self.backups_of(container)[-1:]
        newest_id = newest[0]["id"] if newest else None
        warnings = []
        for digest, record in sorted(quarantined.items()):
            try:  # written after it was found: by a backup, from the source (not the bad file a killed run left)
                if os.stat(self.blob_path(digest)).st_mtime <= record.found_at:
                    continue
            except FileNotFoundError:
                continue
            self._write_record(record._replace(healed_utc=now_utc(), healed_by=f"backup {newest_id} of {container}"))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.quarantine_copy(digest))
            warnings.append(
                f"stored again from its source: blob {digest} ({record.text()}), by backup {newest_id} of "
                f"{container}" + self._whose(record)
            )
        quarantined = self.quarantined()
        for listed in self.listed(container):
            if listed.manifest is None:
                continue
            lacks = [what for digest, what in self.missing_blobs(listed.manifest, quarantined) if digest in quarantined]
            if lacks:
                warnings.append(
                    f"backup {listed.id} of {container} is damaged (the source no longer has that content): it lacks "
                    + "; ".join(lacks)
                )
        return warnings

    def disk_usage(self):
        """Bytes the store takes on disk (allocated blocks of every file)."""
        total = 0
        for folder, _dirs, files in os.walk(self.path):
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
        warnings = [
            f"blob {r.digest} was quarantined ({r.why}): backups that need it are damaged"
            for r in self.quarantine_misfits("backup")
        ] + warnings
        warnings += self.heal(container)
        return Retention(removed, blobs, freed, warnings)

    def collect_garbage(self):
        """Remove blobs that no manifest references (call with the exclusive lock held)."""
        referenced = set()
        for container in self.containers():
            for backup_id in self.backup_ids(container):
                try:
                    manifest = self.read_manifest(container, backup_id)
                except BackupError as e:
                    return [], 0, [f"no blob was removed: a manifest cannot be read ({e})"]
                referenced.update(blob["digest"] for blob, _what in manifest_blobs(manifest))
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
        for digest in self.quarantine_records():
            if digest not in referenced:  # no backup needs it any more: neither the bad copy nor its record
                for path in (self.quarantine_copy(digest), self._quarantine_record(digest)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
        return removed, freed, []

    # picking the backup a restore takes

    def listed(self, container):
        """Every backup of a container that has a manifest file, oldest first by id (ids sort by time), readable or
        not: a manifest that exists but cannot be read is a damaged backup, still known by its file's name."""
        out = []
        for backup_id in self.backup_ids(container):
            path = self.manifest_path(container, backup_id)
            try:
                mtime_ns = os.stat(path).st_mtime_ns
            except FileNotFoundError:
                continue
            try:
                out.append(Listed(backup_id, self.read_manifest(container, backup_id), None, mtime_ns))
            except BackupError as e:
                out.append(Listed(backup_id, None, str(e), mtime_ns))
        return out

    def complete(self, container):
        """The backups of a container that can be restored as far as sizes tell (manifest read, every blob present
        with its stored size), oldest first."""
        return [b.manifest for b in self.listed(container) if b.manifest and not self.missing_blobs(b.manifest)]

    def choices(self, container, but=None):
        """What a refused restore says about the other backups: the complete ones by id, and how to ask for one."""
        others = [m for m in self.complete(container) if m["id"] != but]
        if not others:
            return f"No other backup of {container} in {self.path} is complete."
        named = ", ".join(f"{m['id']} (created {m.get('created_utc') or m.get('created')})" for m in reversed(others))
        return (
            f"Complete backups of {container}, newest first: {named}. gpulab restores an older backup only when it is "
            f"asked for by its id: backup: <id> (container_restore), or -e backup_restore_id=<id> with "
            f"backup_containers=[{container}] (playbook gpulab.lab.restore)."
        )

    def attempts_after(self, mtime_ns):
        """Traces of a backup run newer than mtime_ns that wrote no manifest: blobs no readable manifest references
        and files in tmp/, each written after mtime_ns. Returns (blob digests, their bytes, tmp names)."""
        referenced = {blob["digest"] for m in self._readable_manifests() for blob, _what in manifest_blobs(m)}
        blobs, size, tmp = [], 0, []
        for folder, names, prefix in ((self.blobs, blobs, "sha256:"), (self.tmp, tmp, "")):
            with contextlib.suppress(FileNotFoundError):
                for name in sorted(os.listdir(folder)):
                    if prefix and (prefix + name in referenced or not DIGEST_RE.match(prefix + name)):
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        st = os.lstat(os.path.join(folder, name))
                        if st.st_mtime_ns > mtime_ns:
                            names.append(prefix + name)
                            size += st.st_size if prefix else 0
        return blobs, size, tmp

    def pick(self, container, backup_id=None):
        """The manifest to restore: the one named, else the newest backup of the container, which must be complete.

        Never an older backup on its own: a restore that is not of the newest state must be asked for by id, since
        the older backup's work directory and container are another point in time. "The newest" is what the store
        can know of:
          - a manifest that exists but cannot be read (truncated, not JSON, not a manifest): manifests are written
            to tmp/, fsynced and renamed into place last, so one in place that does not parse is damage to a backup
            that was complete, refused by its id (its file's name);
          - a manifest that is readable but whose blobs are missing or of another size: refused, naming them;
          - no manifest, but blobs that no manifest references, written after the newest manifest, and nothing in
            tmp/: a later run committed data and ended without leaving temporary files, as a run that completed
            does. Its manifest may have been lost (a run that failed cleanly looks the same, and content-addressed
            blobs do not say whose they are): refused, naming what was found, until a backup run removes those
            blobs or an id says which backup is meant;
          - files in tmp/ written after the newest manifest: a run was interrupted (killed, or the server went
            down) while writing. It never completed, so it is no backup (manifests are written last): the newest
            manifest's backup is the newest backup, restored with a warning saying what the store holds.
        Returns Picked(manifest, warnings)."""
        check_name(container, "container name")
        if backup_id:
            try:
                return Picked(self.read_manifest(container, check_name(backup_id, "backup id")), [])
            except BackupError as e:
                raise BackupError(f"{e}. {self.choices(container)}") from None
        listed = self.listed(container)
        if not listed:
            known = ", ".join(self.containers()) or "none"
            raise BackupError(f"the store {self.path} has no backup of container {container} (containers: {known})")
        newest = listed[-1]
        refused = f"the newest backup of container {container}, {newest.id}, cannot be restored"
        if newest.manifest is None:
            raise BackupError(f"{refused}: {newest.problem}. Nothing was changed. {self.choices(container)}")
        problems = self.missing_blobs(newest.manifest)
        if problems:
            raise BackupError(
                f"{refused}, it lacks: {'; '.join(p[1] for p in problems)}. Nothing was changed. "
                f"{self.choices(container, newest.id)}"
            )
        blobs, size, tmp = self.attempts_after(newest.mtime_ns)
        found = f"{len(blobs)} blob(s) ({size} bytes) that no manifest references, written after it"
        if blobs and not tmp:
            raise BackupError(
                f"backup {newest.id} may not be the newest of container {container}: the store holds {found} by a "
                "later backup run that left no temporary file, as a complete run does, and has no manifest (lost, or "
                "the run failed; the store cannot tell which, nor whose backup it was). Nothing was changed. "
                + self.choices(container)
                + " A successful backup run removes those blobs."
            )
        warnings = []
        if tmp:
            warnings.append(
                f"a backup run after {newest.id} was interrupted ({len(tmp)} temporary file(s) in {self.tmp}"
                + (f", {found}" if blobs else "")
                + f"): it never completed, so it is no backup; {newest.id} is the newest backup of {container}"
            )
        warnings += [f"backup {b.id} of {container} is damaged: {b.problem}" for b in listed if b.manifest is None]
        return Picked(newest.manifest, warnings)


def write_json(final, data):
    """Write a JSON document durably and atomically: beside its place (not in tmp/, which tells of an interrupted
    backup), fsynced, renamed, its folder fsynced. For the store's own records (quarantine, the scrub's state)."""
    tmp = f"{final}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"), sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
        fsync_dir(os.path.dirname(final))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def manifest_blobs(manifest):
    """(blob entry, what it belongs to) for every blob a manifest references."""
    for i, layer in enumerate(manifest.get("layers") or []):
        for blob in layer.get("blobs") or []:
            yield blob, f"layer {i + 1} ({layer.get('diff_id')})"
    for mount in manifest.get("mounts") or []:
        for blob in mount.get("blobs") or []:
            yield blob, f"the archive of {mount.get('source')}"


# ---- blobs ---------------------------------------------------------------------------------------------------------
