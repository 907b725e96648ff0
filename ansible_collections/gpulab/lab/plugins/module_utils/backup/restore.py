# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""Restoring one container from the store (RestoreJob): pick and verify the backup, stream a `docker load` tar
assembled from its blobs into the engine (LoadTar), unpack its bind mounts, create the container again.

Every blob is checked before Docker changes: its size and the sha256 of its stored file before the engine is asked
for anything, the sha256 of its content before that too (bind-mount archives; every blob with verify=full) or while it
streams (layers; the tar's last member, without which the engine creates nothing, goes only when all matched).
Layers the engine already has go as empty placeholders, which `docker load` does not read. Each bind-mount archive is
read through (its listing) before anything changes too, and a work directory is put back exactly as the backup has it
(mounts.py). The backup is the one asked for or the newest, which must be complete (store.pick): never an older one on
its own, since that would give the container and its files back as they were at another time. Writes nothing to the
store (it holds the store's lock shared, so that no backup removes blobs meanwhile).

A container of the same name that exists already is judged before anything changes (judge_existing): one restored
from this backup, or the one this backup was taken from, is left alone (its files are the backup's or newer); a fresh
notebook that gpulab created and whose student changed nothing in it (fresh_changes: its writable layer and work
directory hold only what Jupyter's start writes) is replaced without force, as after `site.yml` on a reinstalled
server; any other is refused, naming what it holds, unless force says to replace it.
"""

from __future__ import annotations

import calendar
import dataclasses
import hashlib
import json
import os
import re
import stat
import time
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from ansible_collections.gpulab.lab.plugins.module_utils import docker_api as api
from ansible_collections.gpulab.lab.plugins.module_utils.backup import options
from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import (
    CHUNK,
    NOTEBOOK_USER_LABEL,
    RESTORED_LABEL,
    BackupError,
    Progress,
    backup_tag,
    check_name,
    sha256_of,
)
from ansible_collections.gpulab.lab.plugins.module_utils.backup.mounts import archive_kinds, restore_mount
from ansible_collections.gpulab.lab.plugins.module_utils.backup.settings import BUILTIN_NETWORKS, env_name
from ansible_collections.gpulab.lab.plugins.module_utils.backup.store import Store
from ansible_collections.gpulab.lab.plugins.module_utils.backup.streams import (
    ZERO_BLOCK,
    BlobReader,
    padding,
    tar_header,
    tar_member,
)
from ansible_collections.gpulab.lab.plugins.module_utils.backup.verify import verify_backup

# Role notebook's labels on a student's container (plugins/filter/notebook_server.py): whose notebook it is, and the
# image the lab configured for it.
NOTEBOOK_IMAGE_LABEL = "io.gpulab.notebook.image"
# What the start of a notebook nobody has used leaves where its student writes. In the container's writable layer:
# Jupyter's runtime folder (role notebook keeps it in the container, files/gpulab_jupyter_config.py), and the mount
# points the engine makes for the container's mounts and its init. In the work directory (HOME): IPython's empty
# folder. Anything else is a change of the student's.
JUPYTER_RUNTIME_DIR = "/tmp/jupyter-runtime"  # noqa: S108 (a path inside the container)
ENGINE_PATHS = ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf")
INIT_PATHS = ("/sbin/docker-init", "/usr/sbin/docker-init")
JUPYTER_HOME_FOLDERS = frozenset({".ipython"})
CHANGE_KINDS = {0: "changed", 1: "added", 2: "deleted"}  # GET /containers/<id>/changes


class _EngineRefused(BackupError):
    """The engine refused the image we streamed (not a problem of the backup itself)."""


class Existing(NamedTuple):
    """What a restore without force does with a container of the same name: keep (left alone, no error), replace (a
    fresh notebook), refuse (an error); and why, in words."""

    action: str
    why: str


def docker_time(text):
    """Seconds since the epoch of the engine's RFC 3339 time ("2026-12-01T10:44:52.123456789Z"); None if unreadable."""
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", str(text or ""))
    if not match:
        return None
    seconds = calendar.timegm(time.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S")) + float(match.group(2) or 0)
    zone = match.group(3)
    if zone != "Z":
        seconds -= (1 if zone[0] == "+" else -1) * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return seconds


def student_files(path):
    """What a bind-mount source holds beyond the empty folders Jupyter's start makes there (JUPYTER_HOME_FOLDERS):
    names relative to it, a folder with something in it marked '/'; [] for an empty one. A file (or a symlink) as the
    source is itself the student's; a missing source holds nothing."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return []
    if not stat.S_ISDIR(st.st_mode):
        return [os.path.basename(path)]
    found = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name in JUPYTER_HOME_FOLDERS and os.path.isdir(full) and not os.path.islink(full) and not os.listdir(full):
            continue
        found.append(name + "/" if os.path.isdir(full) and not os.path.islink(full) else name)
    return found


def _engine_made(info):
    """Paths of the writable layer the engine and Jupyter's start write (the mount points of the container's mounts
    and init, the network files, Jupyter's runtime folder), and the folders above them, which those writes make or
    change."""
    made = {m.get("Destination") for m in info.get("Mounts") or []} | set(ENGINE_PATHS)
    if (info.get("HostConfig") or {}).get("Init"):
        made |= set(INIT_PATHS)
    made = {os.path.normpath(p) for p in made if p} | {JUPYTER_RUNTIME_DIR}
    above = set()
    for path in made:
        parent = path
        while parent != "/":
            parent = os.path.dirname(parent)
            above.add(parent)
    return made, above - made


def fresh_changes(engine, info):
    """Why a container is not a fresh notebook of gpulab's that its student never changed: [] when it is one.

    Fresh, strictly: labelled by role notebook, not restored from a backup, on the very image the lab configured for
    it (not one carried over or restored), its writable layer holding nothing but what Jupyter's start and the engine
    write (Jupyter's runtime folder, the mount points), its read-write bind mounts (the work directory) nothing but the
    empty folders Jupyter's start makes. Whatever cannot be read counts as a change (any doubt keeps the container)."""
    labels = (info.get("Config") or {}).get("Labels") or {}
    if not labels.get(NOTEBOOK_USER_LABEL):
        return [f"it is not a notebook gpulab created (no label {NOTEBOOK_USER_LABEL})"]
    if labels.get(RESTORED_LABEL):
        return [f"it was restored from backup {labels[RESTORED_LABEL]}"]
    configured = labels.get(NOTEBOOK_IMAGE_LABEL)
    image = engine.image(configured) if configured else None
    if not image or image["Id"] != info.get("Image"):
        return [
            f"it does not run on the plain image the lab configured for it ({configured or 'no label'}): an "
            "environment carried over or restored"
        ]
    status, body = engine.request("GET", f"/containers/{info['Id']}/changes")
    if status != 200:
        return [f"its writable layer cannot be read (the engine answered {status} to GET /changes)"]
    made, above = _engine_made(info)
    found = []
    for change in json.loads(body or b"null") or []:
        path, kind = os.path.normpath(change.get("Path") or "/"), change.get("Kind")
        # A folder above those the engine made for them (or changed): what else it holds shows as its own entries.
        ours = any(path == p or path.startswith(p.rstrip("/") + "/") for p in made) or path in above
        if not (ours and kind in (0, 1)):
            found.append(f"{CHANGE_KINDS.get(kind, 'changed')} {path}")
    if found:
        found = [f"its writable layer holds changes ({', '.join(found[:8])}{', ...' if len(found) > 8 else ''})"]
    for mount in info.get("Mounts") or []:
        if mount.get("Type") == "bind" and mount.get("RW") and mount.get("Source"):
            names = student_files(mount["Source"])
            if names:
                shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                found.append(f"its bind mount {mount['Source']} holds {shown}")
    return found


def judge_existing(engine, info, manifest, asked=False):
    """What a restore without force does with the existing container info (GET /containers/<name>/json) of the
    backup manifest's name. Keep it when it was restored from this backup or, unless the backup was asked for by its
    id (asked: going back to it is then the point), is the container the backup was taken from (it existed under that
    name, on the same image, when the backup was made: its files are at least as new); replace it when it is a fresh
    notebook (fresh_changes); refuse otherwise, saying what it holds and how to force."""
    name, backup_id = manifest["container"], manifest["id"]
    labels = (info.get("Config") or {}).get("Labels") or {}
    if labels.get(RESTORED_LABEL) == backup_id:
        return Existing("keep", f"container {name} was restored from backup {backup_id} already and was left alone")
    created = docker_time(info.get("Created"))
    source_image = manifest["run_settings"].get("image_id")
    source = created is not None and created < manifest.get("created", 0) and info.get("Image") == source_image
    if source and not asked:
        return Existing(
            "keep",
            f"container {name} is the one backup {backup_id} was taken from (it existed on the same image when the "
            "backup was made, so its files are the backup's or newer) and was left alone",
        )
    changes = ["it is the container the backup was taken from, with what its student did since"] if source else []
    changes = changes or fresh_changes(engine, info)
    if not changes:
        return Existing(
            "replace",
            f"the fresh container {name} that gpulab created, which holds no change of its student's, was replaced",
        )
    return Existing(
        "refuse",
        f"container {name} exists and may hold its student's work: {'; '.join(changes)}. It was left alone and "
        f"nothing was changed; backup {backup_id} was not restored. To replace the container with the backup (what "
        "it holds is then lost: back it up first with gpulab.lab.backup), give force: true (playbook "
        f'gpulab.lab.restore: -e backup_restore_force=true -e \'{{"backup_containers": ["{name}"]}}\')',
    )


class Loaded(NamedTuple):
    """What loading the image did: streamed or only tagged, layers the engine had and was sent, bytes sent, content
    bytes whose sha256 was checked while they streamed."""

    image_loaded: bool
    layers_present: int
    layers_sent: int
    bytes_sent: int
    content_bytes: int


@dataclass
class RestoreReport:
    """What a restore did (or, in check mode, would do): the result of container_restore and of the command line."""

    container: str
    backup_id: str
    manifest: str
    image: str
    image_id: str
    warnings: list
    changed: bool = True
    verified: str | None = None
    verified_blobs: int = 0
    verified_bytes: int = 0
    verified_content_bytes: int = 0
    image_loaded: bool = False
    layers_sent: int = 0
    layers_present: int = 0
    bytes_sent: int = 0
    workdir_restored: list = field(default_factory=list)
    workdir_moved_aside: list = field(default_factory=list)
    workdir_kept: list = field(default_factory=list)
    replaced_container: bool = False
    replaced_fresh: bool = False
    container_id: str | None = None
    container_started: bool = False
    seconds: float = 0.0
    container_exists: bool | None = None
    msg: str | None = None
    timings: dict | None = None

    def as_dict(self):
        optional = ("container_exists", "msg", "timings")
        return {k: v for k, v in dataclasses.asdict(self).items() if not (k in optional and v is None)}


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
        yield b"\0" * padding(size)

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

    def __init__(self, **given):
        """given: container_restore's options by their names (options.RESTORE); the others take their defaults."""
        p = options.values(options.RESTORE, given)
        container, backup = p["container"], p["backup"]
        self.name = check_name(container, "container name")
        self.backup_id = check_name(backup, "backup id") if backup else None
        self.store = Store(p["store"])
        self.force = p["force"]
        self.restore_workdir = p["restore_workdir"]
        self.keep_present_mounts = p["keep_present_mounts"]
        self.verify_only = p["verify_only"]
        self.verify = p["verify"]
        self.env = {str(k): "" if v is None else str(v) for k, v in (p["env"] or {}).items()}
        self.start = p["start"]
        self.docker_host = p["docker_host"]
        self.timeout = p["timeout"] or None
        self.progress = Progress(p["progress_file"])
        self.warnings = []
        self.engine = None

    def run(self, check_mode=False):
        started = time.monotonic()
        with self.store.lock(exclusive=False, progress=self.progress):
            manifest, warnings = self.store.pick(self.name, self.backup_id)
            self.warnings.extend(warnings)
            report = self._report(manifest)
            existing = None
            if not self.verify_only:
                self.engine = api.Engine(self.docker_host, self.timeout)
                existing = self.engine.container(self.name)
                if existing and not self.force:
                    verdict = judge_existing(self.engine, existing, manifest, asked=bool(self.backup_id))
                    if verdict.action == "refuse":
                        raise BackupError(verdict.why)
                    if verdict.action == "keep":
                        return replace(report, changed=False, container_exists=True, msg=verdict.why).as_dict()
                    report = replace(report, replaced_fresh=True)
                self._check_can_create(manifest)
            self.progress.set("verify")
            if check_mode and not self.verify_only:
                problems = self.store.missing_blobs(manifest)
                if problems:
                    raise BackupError(
                        f"backup {manifest['id']} is damaged: "
                        + "; ".join(p[1] for p in problems)
                        + f". {self.store.choices(self.name, manifest['id'])}"
                    )
                return replace(report, verified="sizes", msg=self._would(manifest, existing)).as_dict()
            full = self.verify == "full" or self.verify_only
            try:
                figures = verify_backup(
                    self.store,
                    manifest,
                    layer_content=full,
                    mount_content=self.verify != "stored" and (self.restore_workdir or self.verify_only),
                    progress=self.progress,
                    found_by=None if check_mode else "restore",  # check mode finds, and moves nothing
                )
                # Each archive's listing too, before Docker or a file changes: what the work directory will hold.
                mounts, kept = self._mounts(manifest)
                kinds = [archive_kinds(self.store, m) for m in mounts]
            except BackupError as e:
                raise BackupError(f"{e} {self.store.choices(self.name, manifest['id'])}") from e
            report = replace(
                report,
                verified="full" if full else self.verify,
                verified_blobs=figures.blobs,
                verified_bytes=figures.stored_bytes,
                verified_content_bytes=figures.content_bytes,
            )
            if self.verify_only:
                msg = f"backup {manifest['id']} of {self.name} is complete and intact"
                return replace(report, changed=False, msg=msg).as_dict()
            report = self._restore(manifest, existing, replace(report, workdir_kept=kept), zip(mounts, kinds))
        return replace(report, seconds=round(time.monotonic() - started, 2), timings=self.progress.remove()).as_dict()

    def _report(self, manifest):
        repo, tag = backup_tag(self.name, manifest["id"])
        return RestoreReport(
            container=self.name,
            backup_id=manifest["id"],
            manifest=self.store.manifest_path(self.name, manifest["id"]),
            image=f"{repo}:{tag}",
            image_id=manifest["image"]["id"],
            warnings=self.warnings,
        )

    def _mounts(self, manifest):
        """The bind-mount archives to unpack, and the sources kept as the server has them (keep_present_mounts: a
        source that holds files is the student's live work, newer than any backup)."""
        mounts = manifest.get("mounts") or [] if self.restore_workdir else []
        if not self.keep_present_mounts:
            return mounts, []
        kept = [m["source"] for m in mounts if student_files(m["source"])]
        return [m for m in mounts if m["source"] not in kept], kept

    def _would(self, manifest, existing):
        unpacked, kept = self._mounts(manifest)
        mounts = [m["source"] for m in unpacked]
        return (
            f"would load backup {manifest['id']} of {self.name} ({len(manifest['layers'])} layers), "
            + (
                f"restore {', '.join(mounts)} as the backup has them (paths it lacks moved to "
                "<source>.gpulab-moved-<UTC time>/), "
                if mounts
                else ""
            )
            + (f"keep {', '.join(kept)} as the server has it, " if kept else "")
            + (
                f"replace the existing container{' (fresh)' if not self.force else ''}"
                if existing
                else "create the container"
            )
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
            status, _body = self.engine.request("GET", f"/networks/{api.quoted(network)}")
            if status == 404:
                raise BackupError(f"{self.name} was on network {network}, which the engine lacks: create it first")

    def _restore(self, manifest, existing, report, mounts):
        """mounts: (archive entry, its listing) of each bind-mount source to unpack."""
        loaded = self._load_image(manifest)
        if existing:
            if report.replaced_fresh:  # again, at the last moment: the student may have begun to work in it
                now = self.engine.container(existing["Id"]) or existing
                changes = fresh_changes(self.engine, now)
                if changes:
                    raise BackupError(
                        f"container {self.name} was fresh but changed while backup {manifest['id']} was loaded "
                        f"({'; '.join(changes)}); it was left alone (the backup's image is loaded as {report.image})"
                    )
            self.progress.set("removing the existing container")
            self.engine.json("DELETE", api.query(f"/containers/{existing['Id']}", force="1"))
        restored, moved = [], []
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for mount, listing in mounts:
            self.progress.set("restoring bind mounts", mount=mount["source"])
            done = restore_mount(self.store, mount, listing, stamp)
            restored.append(done.source)
            if done.moved_to:
                moved.append({"source": done.source, "moved_to": done.moved_to, "paths": done.moved})
                self.warnings.append(
                    f"{len(done.moved)} path(s) of {done.source} that backup {manifest['id']} does not have were "
                    f"moved to {done.moved_to}"
                )
        self.progress.set("creating the container")
        container_id = self._create(manifest, report.image)
        started = self._should_start(manifest)
        if started:
            self.progress.set("starting the container")
            try:
                self.engine.json("POST", f"/containers/{container_id}/start", ok=(204, 304))
            except api.DockerApiError as e:
                raise BackupError(
                    f"{self.name} was restored from backup {manifest['id']} and created, but does not start: {e}"
                ) from e
        return replace(
            report,
            image_loaded=loaded.image_loaded,
            layers_present=loaded.layers_present,
            layers_sent=loaded.layers_sent,
            bytes_sent=loaded.bytes_sent,
            verified_content_bytes=report.verified_content_bytes + loaded.content_bytes,
            replaced_container=bool(existing),
            workdir_restored=restored,
            workdir_moved_aside=moved,
            container_id=container_id,
            container_started=started,
            msg=f"restored {self.name} from backup {manifest['id']}"
            + (
                " (replacing the fresh container gpulab had created, which held no change of its student's)"
                if report.replaced_fresh
                else " (replacing the existing container)"
                if existing
                else ""
            )
            + (
                f"; kept {', '.join(report.workdir_kept)} as the server has it (it holds files)"
                if report.workdir_kept
                else ""
            )
            + (", started" if started else ""),
        )

    def _present_prefix(self, diff_ids):
        """How many of the first layers the engine already has, as the start of some image's layers."""
        best = 0
        for image in self.engine.json("GET", "/images/json") or []:
            layers = ((self.engine.image(image["Id"]) or {}).get("RootFS") or {}).get("Layers") or []
            common = 0
            for mine, theirs in zip(diff_ids, layers):
                if mine != theirs:
                    break
                common += 1
            best = max(best, common)
            if best == len(diff_ids):
                break
        return best

    def _send(self, manifest, config_bytes, skip, repo_tag):
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
        return Loaded(
            image_loaded=True,
            layers_present=skip,
            layers_sent=len(manifest["layers"]) - skip,
            bytes_sent=stream.sent,
            content_bytes=sum(x["size"] for x in manifest["layers"][skip:]) if check else 0,
        )

    def _load_image(self, manifest):
        """The backup's image into the engine (only tagged when the engine has it); returns what was sent."""
        repo, tag = backup_tag(self.name, manifest["id"])
        config_bytes = manifest["image"]["config"].encode("utf-8")
        image_id = sha256_of(config_bytes)
        if self.engine.image(image_id):
            path = api.query(f"/images/{api.quoted(image_id)}/tag", repo=repo, tag=tag)
            self.engine.json("POST", path)
            return Loaded(False, len(manifest["layers"]), 0, 0, 0)
        self.progress.set("finding the layers the engine has")
        skip = self._present_prefix([layer["diff_id"] for layer in manifest["layers"]])
        try:
            loaded = self._send(manifest, config_bytes, skip, f"{repo}:{tag}")
        except _EngineRefused as e:
            if not skip:
                raise
            self.warnings.append(f"loading with the engine's own {skip} first layers failed ({e}); sent them all")
            loaded = self._send(manifest, config_bytes, 0, f"{repo}:{tag}")
        found = self.engine.image(f"{repo}:{tag}")
        if not found or found["Id"] != image_id:
            raise BackupError(
                f"the engine loaded the image of backup {manifest['id']} but {repo}:{tag} is not {image_id}"
            )
        return loaded

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
        created = self.engine.json("POST", api.query("/containers/create", name=settings["name"]), body)
        for network in sorted(set(networks) - {first}):
            self.engine.json(
                "POST",
                f"/networks/{api.quoted(network)}/connect",
                {"Container": created["Id"], "EndpointConfig": networks[network]},
            )
        for warning in created.get("Warnings") or []:
            self.warnings.append(f"the engine: {warning}")
        return created["Id"]
