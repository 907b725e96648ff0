# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""One backup of one container (BackupJob): what there is (inspect), which path it takes and why, what it would do
(plan, check mode), and the run into the store: lock, leftovers of a killed run, the container read by one of the
sources, its bind mounts archived, the manifest written last, retention. Its report is a BackupReport. A run that fails
or is stopped (Stopped) leaves the store as it found it: what it paused thawed, its temporary files removed, no
manifest; an OSError is told as a BackupError with its path and, on a full disk, the space needed.

BackupJob takes the options of container_backup by their names (options.py declares them); the path is chosen here,
the reading is the sources' (sources.py), one docker load-able tar is archive.py's. Never restores anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

from ansible_collections.gpulab.lab.plugins.module_utils import docker_api as api
from ansible_collections.gpulab.lab.plugins.module_utils.backup import options, sources
from ansible_collections.gpulab.lab.plugins.module_utils.backup.archive import write_archive
from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import (
    DOCKER_MAX_LAYERS,
    FORMAT,
    FORMAT_VERSION,
    BackupError,
    Progress,
    check_name,
    new_backup_id,
    now_utc,
    os_error_text,
    sha256_of,
)
from ansible_collections.gpulab.lab.plugins.module_utils.backup.mounts import archive_mount, plan_mounts
from ansible_collections.gpulab.lab.plugins.module_utils.backup.settings import redact_config, run_settings
from ansible_collections.gpulab.lab.plugins.module_utils.backup.store import Store
from ansible_collections.gpulab.lab.plugins.module_utils.backup.streams import zstd_level

FAST, FALLBACK, FLATTEN = "overlay-upperdir", "commit-save", "export-flatten"
# Keys of a report that are there only when a run sets them.
OPTIONAL = ("check_mode", "msg", "image", "bytes_discarded", "bytes_freed", "store_bytes", "timings")


@dataclass
class BackupReport:
    """What a backup did (or, in check mode, would do): the result of container_backup and of the timer's command."""

    container: str
    format: str
    path_taken: str
    path_reason: str | None
    layer_count: int
    flattened: bool
    skipped_mounts: list
    secret_env_left_out: list
    run_settings: dict
    warnings: list
    archive_path: str | None = None
    changed: bool = True
    backup_id: str | None = None
    manifest: str | None = None
    base_image_stored: bool = False
    chunks_new: int = 0
    chunks_reused: int = 0
    paused_seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    layers_new: int = 0
    layers_reused: int = 0
    seconds: float = 0.0
    image_id: str | None = None
    removed_backups: list = field(default_factory=list)
    removed_blobs: list = field(default_factory=list)
    mounts: list = field(default_factory=list)
    check_mode: bool | None = None
    msg: str | None = None
    image: str | None = None
    bytes_discarded: int | None = None
    bytes_freed: int | None = None
    store_bytes: int | None = None
    timings: dict | None = None

    def as_dict(self):
        data = dataclasses.asdict(self)
        return {k: v for k, v in data.items() if not (k in OPTIONAL and v is None)}


class BackupJob:
    """One backup of one container: into the store (the fast path, commit + save, or export when the image must be
    flattened), or as one `docker load`-able tar (format docker-archive)."""

    def __init__(self, **given):
        """given: container_backup's options by their names (options.BACKUP); the others take their defaults."""
        p = options.values(options.BACKUP, given)
        container, store, archive_path = p["container"], p["store"], p["archive_path"]
        keep_last, flatten_threshold, format_ = p["keep_last"], p["flatten_threshold"], p["format"]
        self.name = check_name(container, "container name")
        if format_ == "store" and not store:
            raise BackupError("a backup into the store needs store (the store's folder on the server)")
        if format_ == "docker-archive" and not (archive_path and os.path.isabs(archive_path)):
            raise BackupError("format docker-archive needs archive_path, an absolute path of the tar to write")
        if int(keep_last) < 1:
            raise BackupError(f"keep_last must be at least 1 (the newest backup is never removed), not {keep_last}")
        if not 0 <= int(flatten_threshold) <= DOCKER_MAX_LAYERS:
            raise BackupError(
                f"flatten_threshold must be between 1 and Docker's limit of {DOCKER_MAX_LAYERS} layers, or 0 (never)"
            )
        zstd_level(p["compression_level"])
        self.store_path = store
        self.keep_last = int(keep_last)
        self.include_workdir = p["include_workdir"]
        self.pause = p["pause"]
        self.fmt = format_
        self.archive_path = archive_path
        self.flatten_threshold = int(flatten_threshold)
        self.secret_patterns = list(p["secret_env"])
        self.level = int(p["compression_level"])
        self.timeout = p["timeout"] or None
        self.engine = api.Engine(p["docker_host"], self.timeout)
        self.progress = Progress(p["progress_file"])
        self.fast_path = bool(p["fast_path"])
        self.full_read_days = int(p["full_read_days"])
        if self.full_read_days < 0:
            raise BackupError(f"full_read_days must be 0 (never) or more, not {self.full_read_days}")
        self.path_taken = None
        self.path_reason = None
        self.container = None
        self.workdir_pauses = []  # the pauses for work-directory files that kept changing while they were read

    # what there is

    def inspect(self):
        self.info = self.engine.container(self.name)
        if self.info is None:
            raise BackupError(f"no container named {self.name} on the Docker engine at {self.engine.socket}")
        image_info = self.engine.image(self.info["Image"]) or {}
        settings = run_settings(self.info, image_info, self.secret_patterns)
        self.container = sources.Container(
            self.name, self.engine, self.info, image_info, settings, self.pause, self.level, self.progress, self.timeout
        )
        self.layer_count = self.container.layer_count
        self.flatten = bool(self.flatten_threshold) and self.layer_count >= self.flatten_threshold
        self.secrets = settings["secret_env"]
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
            self.container.notices.append(
                f"the image of {self.name} would have {self.layer_count} layers (flatten_threshold "
                f"{self.flatten_threshold}, Docker's limit {DOCKER_MAX_LAYERS}): the backup flattens it into one layer"
            )
        self.upper, self.base_config, refusal = self._fast_path_check()
        if self.flatten:
            self.path_taken, self.path_reason = FLATTEN, "the image is flattened (layer count)"
        elif refusal:
            self.path_taken, self.path_reason = FALLBACK, refusal
        else:
            self.path_taken = FAST

    def _fast_path_check(self):
        return sources.fast_path_refusal(
            self.engine, self.info, archive_format=self.fmt != "store", fast_path=self.fast_path
        )

    def _report(self):
        return BackupReport(
            container=self.name,
            format=self.fmt,
            path_taken=self.path_taken,
            path_reason=self.path_reason,
            layer_count=1 if self.flatten else self.layer_count,
            flattened=self.flatten,
            skipped_mounts=self.skipped,
            secret_env_left_out=self.secrets,
            run_settings=self.container.settings,
            warnings=self.container.notices,
            archive_path=self.archive_path if self.fmt == "docker-archive" else None,
        )

    def plan(self):
        """Check mode: what a backup would do, changing nothing (the store is not even created)."""
        self.inspect()
        report = self._report()
        layers = [] if self.flatten else self.container.base_layers
        in_store, remove = 0, []
        if self.fmt == "store":
            store = Store(self.store_path, create=True)
            if os.path.isdir(store.path):
                index = store.layer_index()
                in_store = sum(1 for d in layers if d in index)
                ids = [m["id"] for m in store.backups_of(self.name)] if os.path.isdir(store.backups) else []
                remove = ids[: max(0, len(ids) + 1 - self.keep_last)]
        base_image_stored = self.path_taken == FAST and in_store < len(layers)  # its layers would go in first
        how = {
            FLATTEN: "export and flatten",
            FALLBACK: "commit and save",
            FAST: "read the writable layer (overlay2 upper directory) of",
        }[self.path_taken]
        layers_new = report.layer_count - in_store
        msg = (
            f"would {how} container {self.name} ({'paused' if self.pause else 'not paused'})"
            + (f" ({self.path_reason})" if self.path_reason else "")
            + (", after storing its image's layers" if base_image_stored else "")
            + f", store up to {layers_new} new layer(s) "
            f"({in_store} already in the store), archive {len(self.mounts)} bind mount(s)"
            + (f" and remove backup(s) {', '.join(remove)}" if remove else "")
        )
        return dataclasses.replace(
            report,
            check_mode=True,
            base_image_stored=base_image_stored,
            layers_reused=in_store,
            layers_new=layers_new,
            removed_backups=remove,
            mounts=[dict(m) for m in self.mounts],
            msg=msg,
        ).as_dict()

    def run(self):
        started = time.monotonic()
        self.inspect()
        report = write_archive(self) if self.fmt == "docker-archive" else self._run_store()
        report.seconds = round(time.monotonic() - started, 2)
        report.timings = self.progress.remove()
        return report.as_dict()

    # into the store

    def _previous_mounts(self, store):
        with contextlib.suppress(BackupError):
            manifests = store.backups_of(self.name)
            if manifests:
                return {m["source"]: m for m in manifests[-1].get("mounts") or []}
        return {}

    def _archive_mounts(self, store, previous, known):
        archived = []

        def pause():
            paused = sources.PausedIfItCan(self.container, store)
            self.workdir_pauses.append(paused)
            return paused

        for mount in self.mounts:
            self.progress.set("archiving bind mounts", mount=mount["source"])
            done = archive_mount(
                store,
                mount,
                previous,
                self.level,
                known=known,
                progress=self.progress,
                pause=pause,
                full_read_days=self.full_read_days,
            )
            archived.append(done)
            if done.warning:
                self.container.notices.append(done.warning)
        return archived

    def _read(self, store, index, backup_id, archive_mounts):
        """The container read into the store by the path chosen, falling back from the fast path when its upper
        directory cannot be read as a layer."""
        c = self.container
        if self.path_taken == FLATTEN:
            return sources.export_flat(c, store, index[0], archive_mounts)
        done = None
        if self.path_taken == FAST:
            done = sources.read_upper(
                c,
                store,
                index,
                backup_id,
                upper=self.upper,
                base_config=self.base_config,
                full_read_days=self.full_read_days,
            )
            if done.unreadable is None:
                archive_mounts()
                return done
            self.path_taken, self.path_reason = FALLBACK, done.unreadable
        read = sources.commit_and_save(c, store, index, backup_id, archive_mounts)
        return done.then(read) if done else read

    def _run_store(self):
        store = Store(self.store_path, create=True)
        try:
            store.create()
        except OSError as e:
            raise BackupError(f"the backup store cannot be made: {os_error_text(e, store.path)}") from e
        with store.lock(exclusive=True, progress=self.progress):
            try:
                return self._store_run(store)
            except OSError as e:
                self._tidy(store)
                where = os_error_text(e, store.path)
                raise BackupError(f"{where} (while {self.progress.phase}, backing up {self.name})") from e
            except BaseException:
                self._tidy(store)
                raise

    def _tidy(self, store):
        """After a failed or stopped run, with the lock still held: thaw what it left paused (the markers) and remove
        its temporary files. A marker whose container cannot be thawed is kept, for the next run or the timer's thaw."""
        try:
            sources.thaw_marked(self.engine, store)
            store.clean_tmp()
        except (OSError, BackupError, api.DockerApiError) as e:
            self.container.notices.append(f"the store's tmp/ could not be tidied after the failure: {e}")

    def _write_manifest(self, store, manifest):
        """The manifest, written last; an OSError (a full disk) names the manifest and the space it needs."""
        self.progress.set("writing the manifest")
        try:
            return store.write_manifest(manifest)
        except OSError as e:
            final = store.manifest_path(self.name, manifest["id"])
            needed = len(json.dumps(manifest, indent=1, sort_keys=True)) + 1
            raise BackupError(
                f"the manifest {final} could not be written: {os_error_text(e, store.tmp, needed)}; this backup of "
                f"{self.name} is not kept, the backups before it are intact"
            ) from e

    def _store_run(self, store):
        sources.unpause_after_a_killed_run(self.container, store)
        cleaned = store.clean_tmp()
        if cleaned:
            self.container.notices.append(
                f"removed {len(cleaned)} temporary file(s) an interrupted backup left in the store"
            )
        known = store.blob_index()
        index = (known, store.layer_index())
        previous = self._previous_mounts(store)
        backup_id = new_backup_id()
        archived = []

        def archive_mounts():
            archived.extend(self._archive_mounts(store, previous, known))

        read = self._read(store, index, backup_id, archive_mounts)
        mounts = [done.entry for done in archived]
        config_bytes = redact_config(read.config, set(self.secrets))
        manifest = self._manifest(backup_id, config_bytes, read.layers, read.committed_id, mounts)
        path, size = self._write_manifest(store, manifest)
        if read.upper_state is not None:  # what the next backup's metadata walk compares with
            try:
                size += read.upper_state.save(backup_id)
            except OSError as e:  # a cache: the next backup reads the writable layer in full
                self.container.notices.append(f"the stat cache of {self.name} could not be written: {e}")
        self.progress.set("retention")
        retention = store.retention(self.name, self.keep_last)
        self.container.notices.extend(retention.warnings)
        report = self._report()
        return dataclasses.replace(
            report,
            backup_id=backup_id,
            manifest=path,
            image_id=manifest["image"]["id"],
            layer_count=len(read.layers),
            layers_new=sum(1 for layer in read.layers if layer["new"]),
            layers_reused=sum(1 for layer in read.layers if not layer["new"]),
            base_image_stored=read.base_image_stored,
            chunks_new=read.chunks_new,
            chunks_reused=read.chunks_reused,
            paused_seconds=round(read.paused_seconds + sum(p.seconds for p in self.workdir_pauses), 2),
            removed_backups=retention.removed,
            removed_blobs=retention.blobs,
            bytes_freed=retention.freed,
            mounts=[{k: m[k] for k in ("source", "destination", "kind", "size", "reused")} for m in mounts],
            store_bytes=store.disk_usage(),
            bytes_read=read.bytes_read + sum(done.read for done in archived),
            bytes_written=read.bytes_written + sum(done.written for done in archived) + size,
            bytes_discarded=read.bytes_discarded,
        )

    def _manifest(self, backup_id, config_bytes, layers, source_id, mounts):
        settings = self.container.settings
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
                "source_image": settings["image"],
                "source_image_id": settings["image_id"],
            },
            "layers": [{"diff_id": x["diff_id"], "size": x["size"], "blobs": x["blobs"]} for x in layers],
            "mounts": mounts,
            "skipped_mounts": self.skipped,
            "run_settings": settings,
            "secret_env": self.secrets,
        }
