# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""The images a student's environment lives on, for module notebook_containers:

  - carry_over: the (stopped) container's writable layer committed into gpulab-carry/<container>:<stamp> (labelled
    io.gpulab.notebook.carry), on top of the image it ran on, so that every file the student added, changed or
    deleted (commit keeps whiteouts) is in the new container. The backup package's flatten guard decides when the
    image would grow too deep (BackupJob.flatten, flatten_threshold): the container is then exported as one layer by
    the backup package's docker-archive writer and loaded, instead of committed;
  - rebase: the student's layers (everything above the lab image the environment was made from) taken from the
    safety backup that was just written, on top of the new lab image, loaded by the backup package's LoadTar;
  - forget_carry_images: the carry-over images of a container that no container uses any more, removed.
Changes images only, never a container.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time

from ansible_collections.gpulab.lab.plugins.module_utils import docker_api as api
from ansible_collections.gpulab.lab.plugins.module_utils.backup.backup import BackupJob
from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import BackupError, now_utc
from ansible_collections.gpulab.lab.plugins.module_utils.backup.restore import LoadTar
from ansible_collections.gpulab.lab.plugins.module_utils.backup.store import Store

CARRY_REPO = "gpulab-carry"
CARRY_LABEL = "io.gpulab.notebook.carry"


def carry_repo(container):
    """gpulab-carry/<container>, in Docker's grammar for a repository name."""
    return f"{CARRY_REPO}/" + (re.sub(r"[^a-z0-9]+", "-", container.lower()).strip("-") or "container")


def stamp():
    now = time.time()
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


def layers_of(info):
    return list(((info or {}).get("RootFS") or {}).get("Layers") or [])


def based_on(image_info, base_info):
    """Whether an image holds the layers of base first (a carry-over or restored image of it)."""
    mine, theirs = layers_of(image_info), layers_of(base_info)
    return bool(theirs) and mine[: len(theirs)] == theirs


def carry_over(engine, container, name, flatten_threshold, store_path):
    """The stopped container's file system as a new image; flattened when the backup package's guard says so.
    Returns (image reference, flattened)."""
    repo, tag = carry_repo(name), stamp()
    scratch = scratch_folder(store_path)
    try:
        job = BackupJob(
            container=container,
            format="docker-archive",
            archive_path=os.path.join(scratch, "carry.tar"),
            include_workdir=False,
            flatten_threshold=flatten_threshold,
            docker_host=f"unix://{engine.socket}",
        )
        job.inspect()
        if job.flatten:
            return _flattened(engine, job, repo, tag), True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    path = api.query(
        "/commit",
        container=container,
        pause="0",  # stopped: nothing runs that could write meanwhile
        repo=repo,
        tag=tag,
        author="gpulab notebook_containers",
        comment=f"gpulab carry-over of {name} at {now_utc()}",
        changes=f"LABEL {CARRY_LABEL}={name}",
    )
    engine.json("POST", path)
    return f"{repo}:{tag}", False


def _flattened(engine, job, repo, tag):
    """The container exported as one layer (the backup package's docker-archive writer), loaded and tagged."""
    report = job.run()
    with open(job.archive_path, "rb") as tar:
        engine.load(tar)
    loaded = report["image"]
    repo_loaded, _colon, tag_loaded = loaded.rpartition(":")
    engine.json("POST", api.query(f"/images/{api.quoted(loaded)}/tag", repo=repo, tag=tag))
    engine.request("DELETE", api.query(f"/images/{api.quoted(repo_loaded + ':' + tag_loaded)}", noprune="1"))
    return f"{repo}:{tag}"


def raw_config(engine, image_info):
    """The image's config as the engine stores it (the bytes its ID is the sha256 of), from the engine's image
    store; None when it cannot be read there (not root, another storage layout)."""
    image_id = image_info["Id"]
    info = engine.json("GET", "/info") or {}
    root = info.get("DockerRootDir") or "/var/lib/docker"
    for driver in dict.fromkeys(("overlay2", info.get("Driver") or "overlay2")):
        path = os.path.join(root, "image", driver, "imagedb", "content", "sha256", image_id.split(":", 1)[-1])
        with contextlib.suppress(OSError), open(path, "rb") as f:
            return f.read()
    return None


def rebased_config(engine, new_info, added, name):
    """The new lab image's config with the student's layers added (diff IDs and one history entry each)."""
    raw = raw_config(engine, new_info)
    if raw is not None:
        config = json.loads(raw)
    else:
        config = {
            "architecture": new_info.get("Architecture") or "amd64",
            "os": new_info.get("Os") or "linux",
            "config": new_info.get("Config") or {},
            "history": [],
        }
    now = now_utc()
    for key in ("container", "container_config", "id", "parent"):
        config.pop(key, None)
    config["created"] = now
    config["rootfs"] = {"type": "layers", "diff_ids": [*layers_of(new_info), *(x["diff_id"] for x in added)]}
    labels = dict((config.get("config") or {}).get("Labels") or {})
    labels[CARRY_LABEL] = name
    config.setdefault("config", {})["Labels"] = labels
    config["history"] = [
        *(config.get("history") or []),
        *(
            {
                "created": now,
                "created_by": f"gpulab notebook_containers: the changes of {name}",
                "comment": x["diff_id"],
            }
            for x in added
        ),
    ]
    return json.dumps(config, separators=(",", ":")).encode()


def rebase(engine, store_path, container, *, backup_id, old_base_info, new_info):
    """The student's layers of backup backup_id (those above old_base_info's) on top of the new lab image, loaded
    as gpulab-carry/<container>:<stamp>; returns its reference. The engine has the new image's layers: they go as
    empty placeholders (LoadTar's skip)."""
    store = Store(store_path)
    with store.lock(exclusive=False):
        manifest = store.read_manifest(container, backup_id)
        if manifest.get("flattened"):
            raise BackupError(
                f"the safety backup {backup_id} of {container} is flattened into one layer: the student's changes "
                "cannot be told from the old image; use image_policy replace (restore.yml brings the old one back)"
            )
        base = layers_of(old_base_info)
        layers = manifest["layers"]
        if not base or [x["diff_id"] for x in layers[: len(base)]] != base:
            raise BackupError(
                f"{container} is not made of the image it was created from (its layers differ): its changes cannot be "
                "put on the new image; use image_policy replace"
            )
        added = layers[len(base) :]
        skip = [{"diff_id": d, "size": 0, "blobs": []} for d in layers_of(new_info)]
        repo, tag = carry_repo(container), stamp()
        config = rebased_config(engine, new_info, added, container)
        stream = LoadTar(store, config, skip + added, f"{repo}:{tag}", skip=len(skip))
        try:
            engine.load(stream)
        finally:
            stream.close()
    return f"{repo}:{tag}"


def forget_carry_images(engine, name, keep):
    """Remove the carry-over tags of a container's earlier images that no container uses (keep: the one in use).
    An image that is the parent of the one in use is only untagged (the engine keeps its layers). Returns the
    references removed."""
    repo = carry_repo(name)
    used = {c.get("ImageID") for c in engine.json("GET", api.query("/containers/json", all="1")) or []}
    keep_id = (engine.image(keep) or {}).get("Id") if keep else None
    filters = json.dumps({"reference": [repo]})
    removed = []
    for image in engine.json("GET", api.query("/images/json", filters=filters)) or []:
        if image["Id"] in used or image["Id"] == keep_id:
            continue
        for ref in image.get("RepoTags") or []:
            status, _body = engine.request("DELETE", api.query(f"/images/{api.quoted(ref)}"))
            if status == 200:
                removed.append(ref)
    return removed


def scratch_folder(store_path):
    """A private folder for the rare flattened carry-over tar: beside the backup store when there is one (its disk
    is meant for such copies), else /var/tmp."""
    parent = store_path if store_path and os.path.isdir(store_path) else "/var/tmp"  # noqa: S108 (a private folder)
    return tempfile.mkdtemp(prefix="gpulab-notebook-", dir=parent)
