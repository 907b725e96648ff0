# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""`docker save` archives: what images an archive holds (its layout, legacy or OCI), and the checks of an archive
file before it is loaded (name, magic bytes, complete tar, every file its manifest names).

Shared by docker_image_archive (an archive file on the server) and the backup's save-stream ingest (ingest.py, the
engine's GET /images/<id>/get): both read an archive's images with image_entries(). The layouts:
  - legacy (Docker before 25): manifest.json, a list of {Config, Layers, RepoTags} naming members of the archive;
  - OCI (Docker 25 and later): index.json, oci-layout and blobs/sha256/<hex>; the index names image manifests (or
    nested indexes) by digest, an image manifest names its config and layers. Docker 25+ writes a manifest.json
    pointing into blobs/ beside it, which is read first.
Loads nothing into Docker and writes nothing. Standard library only, plus the zstd program for .tar.zst.
"""

from __future__ import annotations

import gzip
import json
import os
import tarfile
from typing import NamedTuple

from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import CHUNK, BackupError
from ansible_collections.gpulab.lab.plugins.module_utils.backup.streams import BlobReader

SMALL_FILE = 4 * 1024 * 1024  # manifests, indexes and configs are kept in memory up to this size
SUFFIXES = {".tar": "tar", ".tar.gz": "gzip", ".tgz": "gzip", ".tar.zst": "zstd", ".tar.zstd": "zstd"}
MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}
OTHER_MAGIC = {
    b"Rar!": "a RAR archive",
    b"PK\x03\x04": "a ZIP archive",
    b"7z\xbc\xaf": "a 7-Zip archive",
    b"BZh": "a bzip2 file",
    b"\xfd7zXZ": "an xz file",
}


class ArchiveError(BackupError):
    """An archive gpulab will not load, with a message the user can act on."""


class ImageEntry(NamedTuple):
    """One image of an archive: the member holding its config, its layers' members in image order, its names."""

    config: str
    layers: list
    tags: list


def blob_member(digest):
    """The member of an OCI archive that holds the blob of a digest."""
    return "blobs/sha256/" + str(digest).split(":", 1)[-1]


def image_entries(files, what="the archive"):
    """The images of an archive from its small files {member name: bytes}, in the archive's order; None when it has
    neither a manifest.json list nor an index.json. Raises ValueError for JSON that does not parse, ArchiveError for
    an OCI index that names what the archive does not hold (what names the archive in that message)."""
    manifest = json.loads(files["manifest.json"]) if "manifest.json" in files else None
    if isinstance(manifest, list) and manifest:
        return [
            ImageEntry(entry.get("Config", ""), list(entry.get("Layers") or []), list(entry.get("RepoTags") or []))
            for entry in manifest
        ]
    if "index.json" not in files:
        return [] if isinstance(manifest, list) else None
    return _oci_entries(files, json.loads(files["index.json"]), what)


def _oci_entries(files, index, what):
    """The image manifests an OCI index names, depth first, following nested indexes (at most 64 documents)."""
    entries = []
    todo = list(index.get("manifests") or [])
    for _document in range(64):
        if not todo:
            break
        desc = todo.pop(0)
        digest = desc.get("digest", "")
        member = blob_member(digest)
        if member not in files:
            raise ArchiveError(f"{what}'s OCI index names {digest}, which it does not hold")
        doc = json.loads(files[member])
        if "manifests" in doc:
            todo = list(doc["manifests"]) + todo
            continue
        config = (doc.get("config") or {}).get("digest")
        if not config:
            raise ArchiveError(f"{what}'s image manifest {digest} has no config")
        name = (desc.get("annotations") or {}).get("io.containerd.image.name")
        layers = [blob_member(layer["digest"]) for layer in doc.get("layers") or []]
        entries.append(ImageEntry(blob_member(config), layers, [name] if name else []))
    return entries


# ---- an archive file on the server ----------------------------------------------------------------------------------


def suffix_format(path):
    """The compression the file name promises, or raise ArchiveError."""
    name = os.path.basename(path).lower()
    for suffix, fmt in sorted(SUFFIXES.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(suffix):
            return fmt
    raise ArchiveError(
        f"{path} is not a docker save archive gpulab can load: its name must end in .tar, .tar.gz, .tgz or .tar.zst "
        "(docker save -o image.tar, optionally compressed with gzip or zstd)."
    )


def sniff_format(path):
    """The compression the file's first bytes show: tar, gzip or zstd; raise ArchiveError for anything else."""
    with open(path, "rb") as f:
        head = f.read(512)
    for magic, fmt in MAGIC.items():
        if head.startswith(magic):
            return fmt
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    for magic, what in OTHER_MAGIC.items():
        if head.startswith(magic):
            raise ArchiveError(f"{path} is {what}, not a docker save archive (.tar, .tar.gz or .tar.zst).")
    raise ArchiveError(f"{path} is neither a tar archive nor gzip- or zstd-compressed: not a docker save archive.")


def open_tar_stream(path, fmt):
    """A file-like object that yields the plain tar bytes of the archive (zstd: the zstd program's output)."""
    if fmt == "tar":
        return open(path, "rb")
    if fmt == "gzip":
        return gzip.open(path, "rb")
    try:
        return BlobReader([path])
    except BackupError as e:
        raise ArchiveError(f"{path} is zstd-compressed, but this machine cannot decompress it: {e}") from e


class _Counter:
    """Counts the bytes read through it (tarfile reads the stream through this)."""

    def __init__(self, stream, progress=None, phase="check"):
        self.stream = stream
        self.count = 0
        self.progress = progress
        self.phase = phase

    def read(self, size=-1):
        data = self.stream.read(size)
        self.count += len(data)
        if self.progress:
            self.progress(self.phase, self.count)
        return data


def _read_member(tar, member, name, path):
    """The member's bytes when it is a small JSON file worth keeping, else None; reads it through either way."""
    handle = tar.extractfile(member)
    if _keep(name, member):
        data = handle.read()
        if len(data) != member.size:
            raise ArchiveError(f"{path} is truncated (inside {name})")
        return data
    # Read through to the end, so that a truncated member is noticed now, not by the engine.
    left = member.size
    while left > 0:
        block = handle.read(min(CHUNK, left))
        if not block:
            raise ArchiveError(f"{path} is truncated (inside {name})")
        left -= len(block)
    return None


def _keep(name, member):
    return name in ("manifest.json", "index.json") or (name.startswith("blobs/sha256/") and member.size <= SMALL_FILE)


def _scan_plain_tar(path, progress=None):
    """A plain tar on disk: read only its headers and small JSON files, seeking over the layers' data.

    A plain tar has no checksum of its contents, so reading the layers through would find nothing that the headers do
    not show: a member that ends past the end of the file, or a missing end-of-archive marker, is a truncated file.
    """
    size = os.path.getsize(path)
    files, names = {}, set()
    end = 0
    try:
        with open(path, "rb") as f:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for member in tar:  # tarfile seeks over each member's data in this mode
                    name = member.name[2:] if member.name.startswith("./") else member.name
                    names.add(name)
                    length = member.size if member.isfile() else 0
                    if member.offset_data + length > size:
                        raise ArchiveError(f"{path} is truncated (inside {name})")
                    end = max(end, member.offset_data + -(-length // 512) * 512)
                    if member.isfile() and _keep(name, member):
                        files[name] = tar.extractfile(member).read()
                    if progress:
                        progress("check", member.offset_data + length)
            f.seek(end)
            if f.read(1024) != b"\0" * 1024:
                raise ArchiveError(f"{path} is truncated (it lacks the end-of-archive blocks after {name})")
    except ArchiveError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise ArchiveError(f"{path} is corrupt or truncated (tar): {e}") from e
    return files, names, size


def scan_archive(path, fmt, progress=None):
    """Read the archive once; return its small JSON files {name: bytes}, its member names and tar size."""
    if fmt == "tar":
        return _scan_plain_tar(path, progress)
    stream = open_tar_stream(path, fmt)
    counter = _Counter(stream, progress)
    files, names = {}, set()
    try:
        try:
            with tarfile.open(fileobj=counter, mode="r|") as tar:
                for member in tar:
                    name = member.name[2:] if member.name.startswith("./") else member.name
                    names.add(name)
                    if member.isfile():
                        data = _read_member(tar, member, name, path)
                        if data is not None:
                            files[name] = data
                # Drain the end-of-archive blocks and the stream, so that the decompressor checks its trailer.
                while counter.read(CHUNK):
                    pass
        finally:
            stream.close()  # zstd's own error, naming the archive, replaces the tar error it caused
    except BackupError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise ArchiveError(f"{path} is corrupt or truncated ({fmt}): {e}") from e
    return files, names, counter.count


def inspect_archive(path, fmt, progress=None):
    """Check the archive and return (layout, image ids, repo tags, tar bytes)."""
    files, names, tar_bytes = scan_archive(path, fmt, progress)
    try:
        entries = image_entries(files)
    except ValueError as e:
        raise ArchiveError(f"{path} has a manifest that is not JSON: {e}") from e
    if entries is None:
        raise ArchiveError(
            f"{path} is a tar archive, but not one docker save wrote: it has neither manifest.json nor index.json."
        )
    ids, tags, named = [], [], []
    for entry in entries:
        base = os.path.basename(entry.config)
        digest = base[: -len(".json")] if base.endswith(".json") else base
        if not digest:
            raise ArchiveError("the archive's manifest.json has an entry without a Config")
        ids.append("sha256:" + digest)
        tags.extend(entry.tags)
        named.extend([entry.config, *entry.layers])
    if not ids:
        raise ArchiveError(f"{path} holds no image (its manifest is empty).")
    missing = sorted(set(named) - names)
    if missing:
        raise ArchiveError(f"{path} is incomplete: its manifest names {', '.join(missing[:3])}, not in the archive.")
    oci = "index.json" in files or "oci-layout" in names
    return ("oci" if oci else "legacy"), ids, tags, tar_bytes
