# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""Verification of a backup's blobs before anything is restored: present, the size and sha256 of each stored file,
and the sha256 of what it decompresses to (small blobs, such as a layer's chunks, checked in batches by one zstd).

Reads the store only: changes nothing, talks to no engine.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import threading
from typing import NamedTuple

from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import CHUNK, BackupError
from ansible_collections.gpulab.lab.plugins.module_utils.backup.store import manifest_blobs
from ansible_collections.gpulab.lab.plugins.module_utils.backup.streams import BlobReader
from ansible_collections.gpulab.lab.plugins.module_utils.files import file_sha256

BATCH_VERIFY_SIZE = 8 * 1024 * 1024
BATCH_VERIFY_FILES = 256


class Verified(NamedTuple):
    """What a verification checked: blobs, bytes of their stored files, bytes of content hashed."""

    blobs: int
    stored_bytes: int
    content_bytes: int


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


def _verify_batch(store, items):
    """True when every blob of items (small ones with a content check) has its stored sha256, and `zstd -dc` of all of
    them, cut by their sizes, gives each one's content sha256."""
    try:
        if any(
            file_sha256(store.blob_path(blob["digest"])) != blob["stored_digest"] for blob, _what, _content in items
        ):
            return False
    except FileNotFoundError:
        return False
    reader = BlobReader(store.blob_path(blob["digest"]) for blob, _what, _content in items)
    good = False
    try:
        good = all(
            _read_digest(reader, blob["size"]) == blob["digest"] for blob, _what, _content in items
        ) and not reader.read(1)
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
    BackupError naming every bad blob. Returns the figures checked (Verified)."""
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
    return Verified(
        blobs=len(todo),
        stored_bytes=sum(item[0]["stored_size"] for item in todo),
        content_bytes=sum(item[0]["size"] for item in todo if item[2]),
    )
