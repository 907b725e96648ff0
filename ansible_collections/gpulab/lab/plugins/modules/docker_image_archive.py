#!/usr/bin/python
# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""Load a `docker save` archive (.tar, .tar.gz or .tar.zst) into the Docker engine, streaming, after checking it.

Why gpulab writes its own module instead of using community.docker.docker_image_load:
- docker_image_load reads only archives the Docker daemon can decompress itself; Debian 12's Docker 20.10 cannot
  read zstd, and a 10 GB deep-learning image is carried around as .tar.zst. This module decompresses .tar.zst
  (with the `zstd` program) and .tar.gz on the server and streams the plain tar into the
  engine's API in chunks, never holding the image in memory.
- It talks to the engine's socket with no read timeout (the Docker SDK's default of 60 s is a known trap for
  multi-GB loads) and writes its progress (bytes done, total, elapsed) to a file, so a role that runs it with
  `async` can show progress while a long load goes on.
- It verifies an optional SHA-256 checksum and checks the archive before loading anything: the file type (by its
  magic bytes, so a .rar or a corrupt file is refused), the tar structure (a truncated file, or one without a layer
  its manifest names, is refused; a compressed archive is decompressed once for this, a plain tar's headers are read
  seeking over the layers, as a plain tar has no checksum of its contents to check) and the image IDs from the
  manifest, in both layouts `docker save` writes (the legacy manifest.json + <id>.json of Docker before 25, and the
  OCI image layout, index.json + oci-layout + blobs/sha256, of Docker 25 and later).
  When every image ID of the archive is already in the engine, nothing is loaded (idempotence).
The module needs only Python's standard library on the server (3.8 or newer).
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: docker_image_archive
short_description: Load a docker save archive (.tar, .tar.gz, .tar.zst) into Docker, streaming and checked
version_added: "0.1.0"
description:
  - Checks a C(docker save) archive on the server, then streams it into the Docker engine unless every image it
    holds is already there.
  - The check runs before anything is loaded. It verifies O(sha256) when given, the file type from its magic bytes
    (plain tar, gzip or zstd; anything else, for example a RAR archive, is an error), the tar structure (a truncated
    or corrupt file, or one without a file its manifest names, is an error; compressed archives are decompressed once
    for it, a plain tar's headers are read seeking over the layers' data) and reads the image IDs from the manifest.
    Both layouts of C(docker save) are read, the legacy one (manifest.json and <id>.json) and the OCI image layout
    (index.json, oci-layout and blobs/sha256) that Docker 25 and later write.
  - .tar.zst is decompressed with the C(zstd) program (package zstd) and .tar.gz with Python's
    gzip module; the plain tar is sent to the engine's C(/images/load) endpoint in chunks with no read timeout, so
    a multi-GB image is neither held in memory nor cut off after 60 seconds.
  - While it loads, it writes its progress as JSON to O(progress_file) (bytes of the tar sent, total, seconds), for
    a role that runs it with C(async) and reports the progress.
  - community.docker.docker_image_load cannot read .tar.zst on Docker before 25, checks no checksum and has no
    way to skip an archive whose images are present; hence this module.
author:
  - gpulab developers
options:
  path:
    description: The archive on the server. Its name must end in .tar, .tar.gz, .tgz or .tar.zst.
    type: path
    required: true
  sha256:
    description: Expected SHA-256 of the archive file, hex. Checked before anything is loaded.
    type: str
  inspect_only:
    description: Only check the archive and return its image IDs; do not talk to Docker.
    type: bool
    default: false
  docker_host:
    description: The engine's socket.
    type: str
    default: unix:///var/run/docker.sock
  timeout:
    description: Seconds to wait for each read from the engine during the load; V(0) waits for ever.
    type: int
    default: 0
  progress_file:
    description: File the progress is written to while the archive is checked and loaded (JSON).
    type: path
  cache_dir:
    description:
      - Folder where the result of a check is kept, per file (path, size and modification time). A later run on the
        same unchanged file reuses it instead of reading the whole archive again (the checksum too).
    type: path
attributes:
  check_mode:
    description: Can run in check mode and return changed status prediction without modifying target.
    support: full
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check mode), when in diff mode.
    support: none
  idempotent:
    description: When run twice in a row, the second run reports no change.
    support: full
"""

EXAMPLES = r"""
---
- name: Load the deepo image from an archive
  docker_image_archive:
    path: /var/cache/gpulab/deepo/deepo.tar.zst
    sha256: 0f3c...e1
"""

RETURN = r"""
---
format:
  description: The archive's compression.
  type: str
  returned: always
  sample: zstd
layout:
  description: C(legacy) or C(oci).
  type: str
  returned: always
image_ids:
  description: The IDs of the images in the archive.
  type: list
  elements: str
  returned: always
  sample: ["sha256:0715030e2e6b..."]
repo_tags:
  description: The names the archive gives its images.
  type: list
  elements: str
  returned: always
missing_ids:
  description: Image IDs that were not in the engine before the load (empty with O(inspect_only)).
  type: list
  elements: str
  returned: always
tar_bytes:
  description: Size of the uncompressed tar.
  type: int
  returned: always
cached:
  description: Whether the check's result came from O(cache_dir).
  type: bool
  returned: when it did
seconds:
  description: Seconds the load took (0 when nothing was loaded).
  type: float
  returned: always
"""

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import time
import traceback

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.gpulab.lab.plugins.module_utils import docker_api as api

CHUNK = 1024 * 1024
SUFFIXES = {".tar": "tar", ".tar.gz": "gzip", ".tgz": "gzip", ".tar.zst": "zstd", ".tar.zstd": "zstd"}
MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}
OTHER_MAGIC = {
    b"Rar!": "a RAR archive",
    b"PK\x03\x04": "a ZIP archive",
    b"7z\xbc\xaf": "a 7-Zip archive",
    b"BZh": "a bzip2 file",
    b"\xfd7zXZ": "an xz file",
}
SMALL_JSON = 4 * 1024 * 1024  # manifests, indexes and configs are read into memory up to this size


class ArchiveError(Exception):
    """An archive gpulab will not load, with a message the user can act on."""


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


def file_sha256(path, progress=None):
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
            done += len(block)
            if progress:
                progress("checksum", done)
    return digest.hexdigest()


class _Zstd:
    """A readable stream of a .zst file's decompressed bytes, from the zstd program (Debian package zstd)."""

    def __init__(self, path):
        program = shutil.which("zstd") or shutil.which("zstd", path="/usr/bin:/bin:/usr/local/bin")
        if not program:
            raise ArchiveError(
                f"{path} is zstd-compressed, but this machine has no zstd program: install the package zstd."
            )
        self.proc = subprocess.Popen([program, "-dcq", "--", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stream = self.proc.stdout

    def read(self, size=-1):
        return self.stream.read(size)

    def close(self):
        self.stream.close()
        err = self.proc.stderr.read().decode(errors="replace").strip()
        self.proc.stderr.close()
        rc = self.proc.wait()
        if rc not in (0, -13):  # -13: SIGPIPE, when the reader stopped early (it reports its own error)
            raise ArchiveError(f"zstd could not decompress the archive: {err or 'exit status ' + str(rc)}")


def open_tar_stream(path, fmt):
    """A file-like object that yields the plain tar bytes of the archive."""
    if fmt == "tar":
        return open(path, "rb")
    if fmt == "gzip":
        return gzip.open(path, "rb")
    return _Zstd(path)


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


def _image_ids_from_legacy(manifest):
    ids, tags = [], []
    for entry in manifest:
        config = entry.get("Config", "")
        base = os.path.basename(config)
        digest = base[: -len(".json")] if base.endswith(".json") else base
        if not digest:
            raise ArchiveError("the archive's manifest.json has an entry without a Config")
        ids.append("sha256:" + digest)
        tags.extend(entry.get("RepoTags") or [])
    return ids, tags


def _image_ids_from_oci(index, blobs):
    """Config digests of the image manifests the OCI index names (following nested indexes)."""
    ids, tags = [], []

    def walk(descriptors, depth=0):
        for desc in descriptors:
            media = desc.get("mediaType", "")
            digest = desc.get("digest", "")
            blob = blobs.get(digest)
            if blob is None:
                raise ArchiveError(f"the archive's OCI index names {digest}, which is not in its blobs/")
            doc = json.loads(blob)
            if "manifests" in doc or media.endswith("index.v1+json") or media.endswith("manifest.list.v2+json"):
                if depth < 4:
                    walk(doc.get("manifests", []), depth + 1)
                continue
            config = doc.get("config", {}).get("digest")
            if not config:
                raise ArchiveError(f"the archive's image manifest {digest} has no config")
            ids.append(config)
            name = desc.get("annotations", {}).get("io.containerd.image.name")
            if name:
                tags.append(name)

    walk(index.get("manifests", []))
    return ids, tags


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
    return name in ("manifest.json", "index.json") or (name.startswith("blobs/sha256/") and member.size <= SMALL_JSON)


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
            stream.close()
    except ArchiveError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise ArchiveError(f"{path} is corrupt or truncated ({fmt}): {e}") from e
    return files, names, counter.count


def inspect_archive(path, fmt, progress=None):
    """Check the archive and return (layout, image ids, repo tags, tar bytes)."""
    files, names, tar_bytes = scan_archive(path, fmt, progress)
    try:
        manifest = json.loads(files["manifest.json"]) if "manifest.json" in files else None
        index = json.loads(files["index.json"]) if "index.json" in files else None
    except ValueError as e:
        raise ArchiveError(f"{path} has a manifest that is not JSON: {e}") from e
    blobs = {"sha256:" + name.rsplit("/", 1)[-1]: data for name, data in files.items() if name.startswith("blobs/")}
    oci = index is not None or "oci-layout" in names
    if isinstance(manifest, list):
        ids, tags = _image_ids_from_legacy(manifest)
    elif index is not None:
        ids, tags = _image_ids_from_oci(index, blobs)
    else:
        raise ArchiveError(
            f"{path} is a tar archive, but not one docker save wrote: it has neither manifest.json nor index.json."
        )
    if not ids:
        raise ArchiveError(f"{path} holds no image (its manifest is empty).")
    missing = sorted(set(_named_files(manifest, index, blobs)) - names)
    if missing:
        raise ArchiveError(f"{path} is incomplete: its manifest names {', '.join(missing[:3])}, not in the archive.")
    return ("oci" if oci else "legacy"), ids, tags, tar_bytes


def _named_files(manifest, index, blobs):
    """The files of the archive that its manifest names: configs and layers (legacy), or the layers' blobs (OCI)."""
    if isinstance(manifest, list):
        for entry in manifest:
            yield entry.get("Config", "")
            yield from entry.get("Layers") or []
        return
    for data in blobs.values():
        try:
            doc = json.loads(data)
        except ValueError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("layers"), list) and "config" in doc:
            for layer in doc["layers"]:
                yield "blobs/sha256/" + str(layer.get("digest", "")).split(":")[-1]


# ---- the Docker engine (module_utils/gpulab_docker_api.py) -------------------------------------------------------


def socket_path(docker_host):
    try:
        return api.socket_path(docker_host)
    except api.DockerApiError as e:
        raise ArchiveError(str(e)) from e


def engine_has_image(sock, image_id, timeout=60):
    try:
        return api.Engine("unix://" + sock, timeout).has_image(image_id)
    except api.DockerApiError as e:
        raise ArchiveError(str(e)) from e


def load_stream(sock, stream, timeout=None, progress=None):
    """Stream the plain tar into /images/load in chunks; return the engine's messages. Raise ArchiveError on error."""

    def sent(n, finished):
        if progress:  # once every byte is sent, the engine unpacks the layers until it answers
            progress("unpacking" if finished else "load", n, force=finished)

    try:
        messages, count = api.Engine("unix://" + sock, timeout).load(stream, sent)
    except api.DockerApiError as e:
        raise ArchiveError(str(e)) from e
    return messages, count


class Progress:
    """Writes {phase, bytes_done, bytes_total, seconds} to a file, at most once a second."""

    def __init__(self, path, total):
        self.file = api.ProgressFile(path)
        self.total = total

    def __call__(self, phase, done, force=False):
        self.file.write(phase, force=force, bytes_done=done, bytes_total=self.total)


class Cache:
    """What an earlier check found out about this very file (same path, size and modification time), in cache_dir.

    A multi-GB compressed archive takes a minute to check; a run that finds the images loaded need not check it again.
    A changed file (truncated, replaced, touched) has another size or time, so it is checked afresh.
    """

    def __init__(self, cache_dir, path):
        self.file = None
        if cache_dir:
            st = os.stat(path)
            key = f"{os.path.realpath(path)}\0{st.st_size}\0{st.st_mtime_ns}".encode()
            self.file = os.path.join(cache_dir, hashlib.sha256(key).hexdigest() + ".json")

    def read(self):
        if not self.file:
            return {}
        try:
            with open(self.file) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write(self, data):
        if not self.file:
            return
        os.makedirs(os.path.dirname(self.file), mode=0o700, exist_ok=True)
        tmp = self.file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.file)


def check_archive(p, result):
    """Checksum, file type, tar structure and image IDs of p["path"], into result; returns the Progress."""
    path = p["path"]
    if not os.path.isfile(path):
        raise ArchiveError(f"{path} does not exist on the server (or is not a file).")
    named = suffix_format(path)
    fmt = sniff_format(path)
    if fmt != named:
        raise ArchiveError(
            f"{path} is named like a {named} archive but its content is {fmt}: a renamed or corrupt file."
        )
    result["format"] = fmt
    cache = Cache(p["cache_dir"], path)
    known = cache.read()
    # Until the tar's size is known, the total is the file's size: right for the checksum and a plain tar's check;
    # the check of a compressed archive counts uncompressed bytes, of a total not known yet (0).
    progress = Progress(p["progress_file"], os.path.getsize(path))
    if p["sha256"]:
        want = p["sha256"].strip().lower()
        want = want[len("sha256:") :] if want.startswith("sha256:") else want
        got = known.get("sha256") or file_sha256(path, progress)
        if got != want:
            raise ArchiveError(
                f"{path} has SHA-256 {got}, not the expected {want}: the file is damaged or not the one meant. "
                "Nothing was loaded."
            )
        result["sha256"] = got
    if known.get("image_ids"):
        result.update({k: known[k] for k in ("layout", "image_ids", "repo_tags", "tar_bytes")}, cached=True)
    else:
        if fmt != "tar":
            progress.total = 0
        layout, ids, tags, tar_bytes = inspect_archive(path, fmt, progress)
        result.update(layout=layout, image_ids=ids, repo_tags=tags, tar_bytes=tar_bytes)
    keep = ("format", "layout", "image_ids", "repo_tags", "tar_bytes", "sha256")
    cache.write({k: result[k] for k in keep if k in result})
    progress.total = result["tar_bytes"]
    return progress


def run_module(module):
    p = module.params
    path = p["path"]
    result = {"changed": False, "path": path, "missing_ids": [], "seconds": 0.0}
    progress = check_archive(p, result)
    fmt, ids, tar_bytes = result["format"], result["image_ids"], result["tar_bytes"]
    if p["inspect_only"]:
        return result

    sock = socket_path(p["docker_host"])
    missing = [i for i in dict.fromkeys(ids) if not engine_has_image(sock, i)]
    result["missing_ids"] = missing
    if not missing:
        return result
    result["changed"] = True
    if module.check_mode:
        return result

    started = time.monotonic()
    stream = open_tar_stream(path, fmt)
    try:
        messages, _ = load_stream(sock, stream, p["timeout"] or None, progress)
    finally:
        stream.close()
    result["seconds"] = round(time.monotonic() - started, 1)
    progress("done", tar_bytes, force=True)
    progress.file.remove()
    result["messages"] = messages
    still = [i for i in missing if not engine_has_image(sock, i)]
    if still:
        raise ArchiveError(f"the engine accepted {path} but still lacks image(s) {', '.join(still)}")
    return result


def main():
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "sha256": {"type": "str"},
            "inspect_only": {"type": "bool", "default": False},
            "docker_host": {"type": "str", "default": "unix:///var/run/docker.sock"},
            "timeout": {"type": "int", "default": 0},
            "progress_file": {"type": "path"},
            "cache_dir": {"type": "path"},
        },
        supports_check_mode=True,
    )
    try:
        result = run_module(module)
    except ArchiveError as e:
        module.fail_json(msg=str(e), path=module.params["path"])
    except Exception as e:
        module.fail_json(msg=f"Unexpected error with {module.params['path']}: {e}", exception=traceback.format_exc())
    module.exit_json(**result)


if __name__ == "__main__":
    main()
