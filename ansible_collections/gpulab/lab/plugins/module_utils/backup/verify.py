# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""Verification of blobs: of a backup's before anything is restored (present, the size and sha256 of each stored
file, and the sha256 of what it decompresses to), and of any blobs the scrub picks (check_blobs). Small blobs, such as
a layer's chunks, are checked in batches by one zstd.

A blob found corrupt is moved to the store's quarantine (Store.quarantine), so that no backup reuses it and the next
backup of its source stores it again; otherwise reads the store only, and talks to no engine.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import threading
from typing import NamedTuple

from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import CHUNK, BackupError, os_error_text
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


class Problem(NamedTuple):
    """A blob that failed its check: its digest, the message, and whether it is corrupt (its file is there: bad)."""

    digest: str
    text: str
    corrupt: bool


def _content_digest(path):
    """(sha256 of what a blob's file decompresses to, its size), or the BackupError of zstd."""
    reader = BlobReader([path])
    digest, size = hashlib.sha256(), 0
    try:
        for chunk in reader.chunks():
            digest.update(chunk)
            size += len(chunk)
    except BackupError:
        reader.close(check=False)
        raise
    reader.close()
    return "sha256:" + digest.hexdigest(), size


def verify_blob(store, blob, what, content):
    """None when the blob is good, else a Problem. A stored file whose sha256 is not the one this entry records is
    judged by its content: a blob stored again from its source may be compressed otherwise than the first time."""
    digest = blob["digest"]
    path = store.blob_path(digest)
    missing = Problem(digest, f"{what}: blob {digest} is missing", False)
    try:
        stored = file_sha256(path)
    except FileNotFoundError:
        return missing
    if stored == blob["stored_digest"] and not content:
        return None
    try:
        found, size = _content_digest(path)
    except BackupError as e:  # zstd's own words at the end ("Restored data doesn't match checksum")
        bad = f"it cannot be decompressed: {str(e).rsplit(' : ', 1)[-1]}"
    else:
        if found == digest and size == blob["size"]:
            return None
        bad = f"its content has {found}, {size} bytes"
    if stored != blob["stored_digest"]:
        bad = f"its file has {stored}, not {blob['stored_digest']}"
    if not os.path.exists(path):
        return missing
    return Problem(digest, f"{what}: blob {digest} is corrupt ({bad})", True)


def _verify_batch(store, items):
    """True when every blob of items (small ones with a content check) has its stored sha256, and `zstd -dc` of all
    of them, cut by their sizes, gives each one's content sha256."""
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


def check_blobs(store, items, *, workers=2, done=None):
    """Check blobs: items are (blob entry, what, content), content True (the stored file's sha256 and the content's)
    or False (the stored file's, and the content's only when that differs: what the scrub asks). done(items) is called
    as each group of items is found good. Returns the Problems, biggest blobs first."""
    todo = sorted(items, key=lambda item: -item[0]["stored_size"])
    lock = threading.Lock()

    def tick(group):
        if done:
            with lock:
                done(group)

    def check(item):
        problem = verify_blob(store, *item)
        if problem is None:
            tick([item])
        return [problem] if problem else []

    def check_batch(
        group,
    ):  # small blobs (a layer's chunks): one zstd for many; a failing batch is checked blob by blob
        if _verify_batch(store, group):
            tick(group)
            return []
        return [p for item in group for p in check(item)]

    big = [item for item in todo if not item[2] or item[0]["stored_size"] > BATCH_VERIFY_SIZE]
    small = [item for item in todo if item[2] and item[0]["stored_size"] <= BATCH_VERIFY_SIZE]
    work = [(check, item) for item in big] + [
        (check_batch, small[i : i + BATCH_VERIFY_FILES]) for i in range(0, len(small), BATCH_VERIFY_FILES)
    ]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return [p for found in pool.map(lambda job: job[0](job[1]), work) for p in found]


def quarantine_corrupt(store, problems, found_by):
    """Move the corrupt blobs among problems to quarantine; returns the problems' messages, each saying where its blob
    went (or why it could not be moved: a read-only copy of a store, for example)."""
    texts = []
    for problem in problems:
        if not problem.corrupt:
            texts.append(problem.text)
            continue
        try:
            store.quarantine(problem.digest, problem.text.split(f"blob {problem.digest} is ", 1)[-1], found_by)
            texts.append(f"{problem.text}; moved to {store.quarantine_copy(problem.digest)}, never used again")
        except OSError as e:
            texts.append(f"{problem.text}; it could not be moved to quarantine ({os_error_text(e)})")
    return texts


def verify_backup(
    store, manifest, *, layer_content=True, mount_content=True, progress=None, workers=2, found_by="restore"
):
    """Check the blobs of a backup: every one present, with its size and the sha256 of its stored file; and the sha256
    of what it decompresses to, for the layers (layer_content) and the bind-mount archives (mount_content). A corrupt
    blob is moved to quarantine, found by found_by (None: left where it is, as in check mode). Raises BackupError
    naming every bad blob. Returns the figures checked (Verified)."""
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
    todo = list(blobs.values())
    figures = {"bytes": 0}

    def done(items):
        figures["bytes"] += sum(item[0]["stored_size"] for item in items)
        if progress:
            progress.update(verified_bytes=figures["bytes"])

    problems = check_blobs(store, todo, workers=workers, done=done)
    if problems:
        raise BackupError(
            f"backup {manifest['id']} of {manifest['container']} is damaged; nothing was changed: "
            + "; ".join(quarantine_corrupt(store, problems, found_by) if found_by else [p.text for p in problems])
        )
    return Verified(
        blobs=len(todo),
        stored_bytes=sum(item[0]["stored_size"] for item in todo),
        content_bytes=sum(item[0]["size"] for item in todo if item[2]),
    )
