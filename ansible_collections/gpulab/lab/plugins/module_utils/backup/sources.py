# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""The readers of a container's file system into the store, one per path a backup can take; each returns the same
typed result, a ContainerRead (the image config, the layer entries, the figures):

  - read_upper, the fast path (overlay-upperdir): the writable layer read straight from the container's overlay2
    upper directory as content-defined chunks, incrementally: the layers of a backup are the image's, the writable
    layer's last full read (while the container runs, or paused when it is small) and one layer of the changes since
    per backup, read while the container is paused (a metadata walk and the changed entries: the pause follows the
    change, not the layer's size); the image's own layers come from the store, or are saved into it first (no
    commit, no pause), the engine's export overlapping the full read;
  - commit_and_save, the fallback (commit-save): the container committed (paused while Docker commits) and the
    committed image read from `docker save`, each layer the store lacks written as one blob;
  - export_flat (export-flatten): the container's whole file system exported as one layer, for an image near
    Docker's layer limit.
Also here: why the fast path cannot be taken (fast_path_refusal), and the pause with its marker in the store's tmp/.
Writes blobs only, never a manifest, and never decides which path a backup takes (backup.py does).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from ansible_collections.gpulab.lab.plugins.module_utils import docker_api as api
from ansible_collections.gpulab.lab.plugins.module_utils.backup import overlay
from ansible_collections.gpulab.lab.plugins.module_utils.backup.blobs import BlobWriter, ChunkedLayerWriter
from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import (
    CHUNK,
    DOCKER_MAX_LAYERS,
    BackupError,
    Progress,
    now_utc,
    sha256_of,
)
from ansible_collections.gpulab.lab.plugins.module_utils.backup.ingest import GuessedWrong, SaveIngest
from ansible_collections.gpulab.lab.plugins.module_utils.backup.settings import CONFIG_KEYS
from ansible_collections.gpulab.lab.plugins.module_utils.backup.tree import CONTENT_SIZES, StatCache
from ansible_collections.gpulab.lab.plugins.module_utils.files import fsync_dir

MAX_DELTAS = 16  # layers of changes over the writable layer's last full read, then a full read again
PAUSED_READ_MAX = 32 * 1024 * 1024  # a writable layer this small is read whole while paused (one layer, no changes)


class NoFastPath(Exception):
    """Why a container's writable layer cannot be read from its upper directory."""


@dataclass
class Container:
    """The container a backup reads, as inspected, and how: its engine, pause, zstd level, progress and notices."""

    name: str
    engine: api.Engine
    info: dict
    image_info: dict
    settings: dict  # run_settings(): the container's config without secret values
    pause: bool
    level: int
    progress: Progress
    timeout: int | None = None
    notices: list = field(default_factory=list)  # what the user should know, in the order it happened

    @property
    def base_layers(self):
        return list((self.image_info.get("RootFS") or {}).get("Layers") or [])

    @property
    def layer_count(self):
        return len(self.base_layers) + 1


class UpperState(NamedTuple):
    """What the fast path recorded of the upper directory, for the stat cache once the manifest is written: the cache,
    whether it was read in full, every path's stat_tuple, and the chain ({"chain": diff ids, "upper", "full_read"})."""

    cache: StatCache
    full: bool
    records: dict
    meta: dict

    def save(self, backup_id):
        """Into the stat cache (after the manifest): returns the bytes written."""
        return self.cache.save(backup_id, {"upper": (self.full, self.records)}, self.meta)


@dataclass
class ContainerRead:
    """What a reader stored: the image config and layer entries (manifest entries, with "new"), and its figures.
    unreadable: why the fast path gave up (config and layers are then None, the figures those of what it did)."""

    config: bytes | None
    layers: list | None
    committed_id: str | None = None
    bytes_read: int = 0
    bytes_written: int = 0
    bytes_discarded: int = 0
    base_image_stored: bool = False
    chunks_new: int = 0
    chunks_reused: int = 0
    paused_seconds: float = 0.0
    unreadable: str | None = None
    upper_state: UpperState | None = None

    def then(self, other):
        """This read's figures added to those of the read that took over from it (other's config and layers)."""
        return replace(
            other,
            bytes_read=self.bytes_read + other.bytes_read,
            bytes_written=self.bytes_written + other.bytes_written,
            bytes_discarded=self.bytes_discarded + other.bytes_discarded,
            base_image_stored=self.base_image_stored or other.base_image_stored,
        )


# ---- why not the fast path -----------------------------------------------------------------------------------------


def fast_path_refusal(engine, info, *, archive_format, fast_path):
    """(upper directory, raw config of the container's image, None) when the writable layer can be read directly;
    else (None, None, why not). Whether the image's layers are in the store is settled later."""
    try:
        return (*_fast_path_parts(engine, info, archive_format, fast_path), None)
    except NoFastPath as e:
        return None, None, str(e)


def _fast_path_parts(engine, info, archive_format, fast_path):
    if archive_format:
        raise NoFastPath("format docker-archive writes one docker load-able tar from docker save")
    if not fast_path:
        raise NoFastPath("fast_path is off")
    driver = info.get("GraphDriver") or {}
    if driver.get("Name") != "overlay2":
        raise NoFastPath(
            f"the container's storage driver is {driver.get('Name') or 'not reported'}, not overlay2 (Docker's "
            "containerd image store, or another driver)"
        )
    upper = (driver.get("Data") or {}).get("UpperDir")
    if not upper:
        raise NoFastPath("the engine does not report the container's UpperDir")
    if os.geteuid() != 0:
        raise NoFastPath("not running as root: the container's writable layer is root's to read")
    if not os.path.isdir(upper):
        raise NoFastPath(
            f"the container's UpperDir {upper} is not on this machine (an engine on another host, or in a VM)"
        )
    root = engine.json("GET", "/info").get("DockerRootDir") or "/var/lib/docker"
    image_id = info.get("Image") or ""
    path = os.path.join(root, "image", "overlay2", "imagedb", "content", "sha256", image_id.split(":", 1)[-1])
    try:
        with open(path, "rb") as f:
            config = f.read()
    except OSError as e:
        raise NoFastPath(f"the config of the container's image cannot be read from the engine's store ({e})") from e
    if sha256_of(config) != image_id:
        raise NoFastPath(f"{path} does not hold the config of image {image_id}")
    return upper, config


# ---- the pause -----------------------------------------------------------------------------------------------------


def pause_marker(store, container_id):
    return os.path.join(store.tmp, f"paused-{container_id}")


def thaw_marked(engine, store):
    """Thaw every container a backup that is gone left paused: its marker paused-<id> in tmp/ proves gpulab froze it,
    not its user. Call with the store's exclusive lock held (no backup of this store is running). Each marker is
    removed once its container runs again (or is gone); returns the names of the containers unpaused."""
    thawed = []
    for name in sorted(os.listdir(store.tmp)) if os.path.isdir(store.tmp) else []:
        if not name.startswith("paused-"):
            continue
        info = engine.container(name[len("paused-") :])
        if info and (info.get("State") or {}).get("Paused"):
            engine.json("POST", f"/containers/{info['Id']}/unpause")
            thawed.append(info["Name"].lstrip("/"))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(store.tmp, name))
    return thawed


def unpause_after_a_killed_run(c, store):
    """A backup killed while it held a container paused (SIGKILL: no cleanup) left its marker in tmp/: thaw every
    such container, this one or another, before clean_tmp removes the markers; then read this container's state
    again, as it was inspected before the lock was taken."""
    for name in thaw_marked(c.engine, store):
        c.notices.append(f"{name} was left paused by a backup that was killed: it was unpaused")
    fresh = c.engine.container(c.info["Id"])
    if fresh:
        c.info["State"] = fresh.get("State") or {}


class Paused:
    """The container paused for a with block, when it runs, its user has not paused it and pause is on. With a store,
    a marker in tmp/ (fsynced before the pause) lets the next backup, or the timer's thaw, thaw it should this process
    be killed meanwhile. A stop (Stopped) or error anywhere in the block, even during the pause request, thaws it.
    seconds: how long it was paused."""

    def __init__(self, c, store=None):
        self.c = c
        self.store = store
        self.seconds = 0.0
        self.froze = False  # it paused the container (at some time)
        self._marker = None
        self._started = None

    def __enter__(self):
        state = self.c.info.get("State") or {}
        if not (self.c.pause and state.get("Running") and not state.get("Paused")):
            return self
        if self.store:
            self._marker = pause_marker(self.store, self.c.info["Id"])
            with open(self._marker, "wb") as f:  # empty; fsynced: it must outlive a SIGKILL
                os.fsync(f.fileno())
            fsync_dir(self.store.tmp)
        self._started = time.monotonic()  # before the request: a stop during it may have paused the container
        self.froze = True
        try:
            self.c.engine.json("POST", f"/containers/{self.c.info['Id']}/pause")
        except BaseException:
            self._thaw(sure=False)
            raise
        return self

    @property
    def active(self):
        """The container is paused by this block now."""
        return self._started is not None

    def _thaw(self, sure=True):
        """Unpause; sure=False: the pause request may not have been done (a 409 "is not paused" is then fine)."""
        status, body = self.c.engine.request("POST", f"/containers/{self.c.info['Id']}/unpause")
        not_paused = status == 409 or "is not paused" in api.error_of(body)
        if status not in (200, 204) and (sure or not not_paused):
            raise api.DockerApiError(f"{self.c.name} could not be unpaused: {api.error_of(body)}")
        self.seconds = round(time.monotonic() - self._started, 2)
        self._started = None
        if self._marker:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._marker)

    def __exit__(self, *exc):
        if self._started is not None:
            self._thaw()
        return False


class PausedIfItCan(Paused):
    """Paused, for work-directory files that keep changing: when the engine cannot freeze the container (runc gives
    up on a process busy in the kernel), the block runs unpaused and `failed` says why."""

    def __init__(self, c, store=None):
        super().__init__(c, store)
        self.failed = None

    def __enter__(self):
        try:
            return super().__enter__()
        except api.DockerApiError as e:
            self.failed = str(e)
            return self


# ---- the fast path: the writable layer read from the overlay2 upper directory --------------------------------------


def _previous_chain(c, store, stored, cache, *, upper, full_read_days):
    """The writable layer's layers (entries, as the store has them) and recorded state of the previous backup, to
    build this one on; (None, None) when a full read is due: no previous fast-path backup of this container with
    this image and upper directory, a stat cache that does not end with it, a layer of it the store lacks (its
    presence check), MAX_DELTAS layers of changes already (or one more would reach Docker's layer limit), or the
    last full read full_read_days old."""
    with contextlib.suppress(BackupError):
        manifests = store.backups_of(c.name)
        meta = cache.meta or {}
        prev = manifests[-1] if manifests else None
        if not prev or prev.get("path_taken") != "overlay-upperdir" or cache.last != prev["id"]:
            return None, None
        layers = [layer["diff_id"] for layer in prev.get("layers") or []]
        base = len(c.base_layers)
        chain = layers[base:]
        fresh = not full_read_days or time.time() - meta.get("full_read", 0) < full_read_days * 86400
        if (
            layers[:base] == c.base_layers
            and chain
            and chain == meta.get("chain")
            and meta.get("upper") == upper
            and len(chain) <= MAX_DELTAS
            and base + len(chain) + 1 < DOCKER_MAX_LAYERS
            and fresh
            and all(d in stored for d in chain)
        ):
            return [dict(stored[d], new=False) for d in chain], cache.tree("upper", prev["id"])
    return None, None


def _chunked(c, store, known, write, pause=None):
    """write(writer) into a ChunkedLayerWriter, in the with block of pause when given (the new chunks are
    compressed and made durable after it); returns (its stats, blob entries, bytes written)."""
    writer = ChunkedLayerWriter(store, known, c.level, c.progress, **CONTENT_SIZES)
    if pause is not None:  # no zstd competes with the paused read for the cores: the chunks are compressed after it
        writer.BATCH_BYTES = writer.BATCH_FILES = 1 << 62
    try:
        with pause or contextlib.nullcontext():
            stats = write(writer)
        if pause is not None:
            del writer.BATCH_BYTES, writer.BATCH_FILES
        if stats.get("changed", 1) == 0:
            writer.abort()  # nothing changed: no layer
            return stats, None, 0
        c.progress.set("compressing the new chunks", bytes_written=writer.written, chunks_new=writer.chunks_new)
        blobs, written = writer.finish()
    except BaseException:
        writer.abort()
        raise
    return stats, blobs, written


def _unsettle_recent(records, since_ns):
    """Mark the paths changed less than a clock tick before since_ns (a walk's start) unsettled: a change after the
    walk within the same tick would leave their attributes as recorded."""
    for name, attrs in records.items():
        if not attrs.endswith(overlay.UNSETTLED) and overlay.attributes(attrs)[6] >= since_ns - overlay.SETTLE_NS:
            records[name] = attrs + overlay.UNSETTLED


def read_upper(c, store, index, backup_id, *, upper, base_config, full_read_days=0):
    """The container's image plus its writable layer read from the upper directory, as layers over the image's: the
    last full read of the upper directory (read while the container runs: write_layer) and one layer of changes per
    backup since (write_changes, while it is paused: the metadata walk and the changed files, nothing else). A full
    read is done when _previous_chain finds none to build on; its image's layers are saved into the store first when
    it lacks some, the engine's export overlapping the full read (no commit, no pause). When the upper directory
    cannot be read as a layer, the result says why (unreadable) and has the figures of what was done."""
    known, stored = index
    cache = StatCache(store, c.name)
    chain, since = _previous_chain(c, store, stored, cache, upper=upper, full_read_days=full_read_days)
    full = chain is None
    done = ContainerRead(None, None)
    base, unreadable = None, None
    pause = Paused(c, store)
    figures = {"read": 0, "written": 0, "new": 0, "reused": 0}

    def progress(st):
        c.progress.update(bytes_read=st["bytes"])

    def read_full():
        """The whole upper directory as a layer: while the container runs (when it holds more than PAUSED_READ_MAX
        bytes; since: what it holds, by a scan before the read, each path marked unsettled unless the read found it
        as scanned, settled and steady), else while it is paused (since: as read; no layer of changes after it)."""
        nonlocal chain, since
        scanned_at = time.time_ns()
        scanned, _targets = overlay.scan(upper, tolerant=True)
        small = sum(int(a.split(" ", 5)[4]) for a in scanned.values()) <= PAUSED_READ_MAX
        c.progress.set(f"reading the writable layer{'' if small else ' (the container runs)'}", upper=upper)
        read = {}
        stats, blobs, written = _chunked(
            c,
            store,
            known,
            lambda w: overlay.write_layer(
                upper,
                w,
                progress=progress,
                record=read,
                changing=not small,
            ),
            pause if small else None,
        )
        since = {
            name: attrs
            if name in read and read[name][1] and overlay.same_as_scanned(attrs, read[name][0])
            else attrs + overlay.UNSETTLED
            for name, attrs in scanned.items()
        }
        _unsettle_recent(since, scanned_at)
        chain = [{"diff_id": stats["diff_id"], "size": stats["tar_bytes"], "blobs": blobs, "new": bool(written)}]
        figures.update(read=stats["tar_bytes"], written=written)

    now = {}
    try:  # only what reading the upper directory raises: the store's own errors are errors
        if any(d not in stored for d in c.base_layers):
            c.progress.set("save: the container's image, into the store")
            while_exporting = read_full if full else None
            done = replace(save_image(c, store, index, c.info["Image"], while_exporting), base_image_stored=True)
            base_config, base = done.config, done.layers
        elif full:
            read_full()
        if full and pause.froze:  # read whole while paused: nothing changed since, no layer of changes
            stats, blobs, written, now = {"tar_bytes": 0}, None, 0, since
        else:
            c.progress.set("reading the changes of the writable layer (paused)", upper=upper)
            paused_at = time.time_ns()
            stats, blobs, written = _chunked(
                c, store, known, lambda w: overlay.write_changes(upper, w, since, now, progress=progress), pause
            )
            _unsettle_recent(now, paused_at)
    except (overlay.UnsupportedOverlay, OSError) as e:
        unreadable = e
    if unreadable is not None:
        reason = f"the writable layer could not be read as a layer: {unreadable}"
        c.notices.append(f"{c.name}: {reason}; the backup commits and saves the container instead")
        return replace(done, config=None, layers=None, committed_id=None, unreadable=reason)
    if blobs is not None:
        chain.append({"diff_id": stats["diff_id"], "size": stats["tar_bytes"], "blobs": blobs, "new": bool(written)})
    if base is None:
        base = [dict(stored[d], new=False) for d in c.base_layers]
    meta = {
        "chain": [layer["diff_id"] for layer in chain],
        "upper": upper,
        "full_read": time.time() if full else (cache.meta or {}).get("full_read", 0),
    }
    return replace(
        done,
        config=upper_config(c, base_config, meta["chain"], backup_id),
        layers=[*base, *chain],
        committed_id=None,
        bytes_read=done.bytes_read + figures["read"] + stats["tar_bytes"],
        bytes_written=done.bytes_written + figures["written"] + written,
        chunks_new=len({b["digest"] for layer in chain if layer["new"] for b in layer["blobs"]}),
        chunks_reused=0,
        paused_seconds=pause.seconds,
        upper_state=UpperState(cache, full, now, meta),
    )


def _committed_config(c):
    """The container's config as `docker commit` puts it into the image, without the secret values."""
    config = {k: v for k, v in (c.info.get("Config") or {}).items() if k in (*CONFIG_KEYS, "Image")}
    config["Env"] = c.settings["config"]["Env"]
    return config


def upper_config(c, base_config, diff_ids, backup_id):
    """The image config `docker commit` would write: the container's image's, with the container's config, and the
    writable layer's layers (its last full read and the changes since), each with a history entry."""
    image = json.loads(base_config)
    now = now_utc()
    for key in ("container", "container_config", "id", "parent"):
        image.pop(key, None)
    image.update(created=now, config=_committed_config(c))
    image["rootfs"] = {"type": "layers", "diff_ids": [*c.base_layers, *diff_ids]}
    image["history"] = [
        *(image.get("history") or []),
        *(
            {
                "created": now,
                "created_by": f"gpulab container_backup: the writable layer of {c.name}"
                + (" (its changes since the layer before)" if i else ""),
                "comment": f"gpulab backup {backup_id} of {c.name}",
            }
            for i in range(len(diff_ids))
        ),
    ]
    return json.dumps(image, separators=(",", ":")).encode()


# ---- the fallback: commit + save -----------------------------------------------------------------------------------


def commit(c, backup_id, repo=None, tag=None):
    c.progress.set("commit")
    path = api.query(
        "/commit",
        container=c.info["Id"],
        pause="1" if c.pause else "0",
        comment=f"gpulab backup {backup_id} of {c.name}",
        author="gpulab container_backup",
        repo=repo,
        tag=tag,
    )
    return c.engine.json("POST", path, timeout=c.timeout)["Id"]


def remove_image(c, ref):
    status, body = c.engine.request("DELETE", api.query(f"/images/{api.quoted(ref)}", noprune="1"))
    if status not in (200, 404):
        c.notices.append(f"the committed image {ref} could not be removed: {api.error_of(body)}")


def commit_and_save(c, store, index, backup_id, while_exporting):
    """Commit the container and store the committed image's layers; the committed image is removed again."""
    image_id = commit(c, backup_id)
    try:
        return replace(save_image(c, store, index, image_id, while_exporting), committed_id=image_id)
    finally:
        remove_image(c, image_id)


def save_image(c, store, index, image_id, while_exporting):
    """Store the layers of an image from GET /images/<id>/get. while_exporting() runs once the engine has started
    (it writes the whole image to a folder of its own before it answers)."""
    expected = (c.engine.image(image_id) or {}).get("RootFS", {}).get("Layers")
    guess = True
    read = ContainerRead(None, None)
    while True:
        pending = c.engine.start_get(f"/images/{api.quoted(image_id)}/get")
        if while_exporting:
            while_exporting()
            while_exporting = None
        c.progress.set("save: the engine exports the image")
        resp = pending.response()
        c.progress.set("save")
        ingest = SaveIngest(
            store, index[0], stored=index[1], expected=expected, level=c.level, guess_by_size=guess, progress=c.progress
        )
        try:
            saved = ingest.read(resp)
        except GuessedWrong as e:
            c.notices.append(f"{e} was not the layer its size suggested: the image was read again")
            guess = False
            continue
        finally:
            resp.close()
            read = replace(
                read,
                bytes_read=read.bytes_read + (ingest.reader.bytes_read if ingest.reader else 0),
                bytes_written=read.bytes_written + ingest.bytes_written,
                bytes_discarded=read.bytes_discarded + ingest.bytes_discarded,
            )
        return replace(read, config=saved.config, layers=saved.layers)


# ---- flattening: the container's whole file system as one layer ----------------------------------------------------


def export_stream(c, consume, store=None):
    """GET /containers/<id>/export (the container's whole file system), paused while it is read (with a marker in
    the store's tmp/ when there is a store); returns consume(response)."""
    with Paused(c, store):
        resp = c.engine.get_stream(f"/containers/{c.info['Id']}/export")
        try:
            return consume(resp)
        finally:
            resp.close()


def flat_config(c, diff_id):
    now = now_utc()
    return json.dumps(
        {
            "architecture": c.image_info.get("Architecture") or "amd64",
            "os": c.image_info.get("Os") or "linux",
            "created": now,
            "config": _committed_config(c),
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [
                {
                    "created": now,
                    "created_by": f"gpulab container_backup: {c.name} flattened from {c.layer_count} layers",
                }
            ],
        },
        separators=(",", ":"),
    ).encode()


def export_flat(c, store, known, while_exporting):
    """The container's file system exported as one layer blob, with a config of its own."""
    while_exporting()
    c.progress.set("export (flatten)")

    def consume(resp):
        with BlobWriter(store, c.level) as writer:
            for block in iter(lambda: resp.read(CHUNK), b""):
                writer.write(block)
                c.progress.update(bytes_read=writer.size, bytes_written=writer.stored_size)
            blob = writer.finish()
            kept, written = store.keep(writer, blob, known)
        layer = {"diff_id": blob["digest"], "size": blob["size"], "blobs": [kept], "new": bool(written)}
        return ContainerRead(flat_config(c, layer["diff_id"]), [layer], bytes_read=blob["size"], bytes_written=written)

    return export_stream(c, consume, store)
