# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""A backup as one `docker load`-able tar (format docker-archive): the committed image from `docker save` (or the
container flattened by export), then gpulab's own members docker load ignores: the run settings and a tar of each
bind-mount source, so that the one file holds all a restore needs.

Writes that one file (atomically) and nothing in any store; the container is read by the sources' commit and export.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import replace

from ansible_collections.gpulab.lab.plugins.module_utils import docker_api as api
from ansible_collections.gpulab.lab.plugins.module_utils.backup import sources
from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import (
    CHUNK,
    FORMAT,
    FORMAT_VERSION,
    BackupError,
    backup_tag,
    new_backup_id,
    now_utc,
    sha256_of,
)
from ansible_collections.gpulab.lab.plugins.module_utils.backup.docker_save import SMALL_FILE
from ansible_collections.gpulab.lab.plugins.module_utils.backup.mounts import parents_of
from ansible_collections.gpulab.lab.plugins.module_utils.backup.streams import (
    ZERO_BLOCK,
    TarOf,
    TarReader,
    padding,
    tar_header,
    tar_member,
)
from ansible_collections.gpulab.lab.plugins.module_utils.files import fsync_dir


def write_archive(job):
    """The backup of job (a BackupJob, inspected) as one tar at job.archive_path; returns its BackupReport."""
    folder = os.path.dirname(job.archive_path)
    if not os.path.isdir(folder):
        raise BackupError(f"the folder of archive_path, {folder}, does not exist on the server")
    if os.path.isdir(job.archive_path):
        raise BackupError(f"archive_path {job.archive_path} is a folder; give the path of the tar file to write")
    backup_id = new_backup_id()
    repo, tag = backup_tag(job.name, backup_id)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(job.archive_path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w+b") as out:
            if job.flatten:
                config_bytes, read = _archive_flat(job, out, f"{repo}:{tag}")
            else:
                config_bytes, read = _archive_saved(job, out, backup_id, repo, tag)
            _archive_extras(job, out, backup_id, config_bytes)
            out.write(ZERO_BLOCK * 2)
            out.flush()
            os.fsync(out.fileno())
            size = out.tell()
        os.rename(tmp, job.archive_path)
        fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    layers = json.loads(config_bytes)["rootfs"]["diff_ids"]
    report = replace(
        job._report(),
        backup_id=backup_id,
        image_id=sha256_of(config_bytes),
        image=f"{repo}:{tag}",
        layer_count=len(layers),
        layers_new=len(layers),
        bytes_read=read,
        bytes_written=size,
        mounts=[dict(m) for m in job.mounts],
    )
    if job.secrets and not job.flatten:
        job.container.notices.append(
            "format docker-archive keeps the image config as docker save wrote it: the values of "
            + ", ".join(job.secrets)
            + " are in it"
        )
    return report


def _archive_saved(job, out, backup_id, repo, tag):
    image_id = sources.commit(job.container, backup_id, repo=repo, tag=tag)
    try:
        pending = job.engine.start_get(f"/images/{api.quoted(repo + ':' + tag)}/get")
        job.progress.set("save: the engine exports the image")
        resp = pending.response()
        job.progress.set("save")
        reader = TarReader(resp, sink=out.write, what="the docker save stream")
        files = {}
        try:
            for member in reader.members():
                if member.isfile() and member.name.endswith(".json") and member.size <= SMALL_FILE:
                    files[member.name] = b"".join(reader.data())
                job.progress.update(bytes_read=reader.bytes_read, bytes_written=reader.bytes_read)
        finally:
            resp.close()
        manifest = json.loads(files["manifest.json"])
        config_bytes = files[manifest[0]["Config"]]
        out.truncate(reader.end_offset)  # the end-of-archive blocks: gpulab's own members come after the image
        out.seek(reader.end_offset)
        return config_bytes, reader.bytes_read
    finally:
        sources.remove_image(job.container, image_id)


def _archive_flat(job, out, repo_tag):
    job.progress.set("export (flatten)")
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

    size = sources.export_stream(job.container, consume)
    out.write(b"\0" * padding(size))
    end = out.tell()
    out.seek(header_at)
    out.write(tar_header("layer/layer.tar", size))
    out.seek(end)
    config_bytes = sources.flat_config(job.container, "sha256:" + digest.hexdigest())
    config_name = sha256_of(config_bytes)[7:] + ".json"
    out.write(tar_member(config_name, config_bytes))
    load_manifest = [{"Config": config_name, "RepoTags": [repo_tag], "Layers": ["layer/layer.tar"]}]
    out.write(tar_member("manifest.json", json.dumps(load_manifest).encode()))
    return config_bytes, size


def _archive_extras(job, out, backup_id, config_bytes):
    """gpulab's own members after the image (docker load ignores them): the run settings, and a tar of each bind
    mount source, so that the one file holds all a restore needs."""
    entries = []
    for i, mount in enumerate(job.mounts):
        job.progress.set("archiving bind mounts", mount=mount["source"])
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
            job.container.notices.append(warning)
        out.write(b"\0" * padding(size))
        end = out.tell()
        out.seek(header_at)
        out.write(tar_header(name, size))
        out.seek(end)
        entries.append({**mount, "member": name, "size": size, "parents": parents_of(mount["source"])})
    info = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "id": backup_id,
        "container": job.name,
        "created_utc": now_utc(),
        "image_id": sha256_of(config_bytes),
        "run_settings": job.container.settings,
        "mounts": entries,
        "skipped_mounts": job.skipped,
        "secret_env": job.secrets,
    }
    out.write(tar_member("gpulab-backup/backup.json", json.dumps(info, indent=1, sort_keys=True).encode()))


# ---- restore -------------------------------------------------------------------------------------------------------
