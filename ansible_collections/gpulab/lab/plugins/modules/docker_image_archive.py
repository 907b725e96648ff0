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
The archive reader is module_utils/backup/docker_save.py, shared with the backup's reading of `docker save` streams;
the engine's client is module_utils/docker_api.py. The module needs only Python's standard library on the server (3.8
or newer).
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
  - gpulab developers (!UNKNOWN)
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
extends_documentation_fragment: [gpulab.lab.attributes, gpulab.lab.attributes.idempotent, gpulab.lab.docker]
attributes: {check_mode: {support: full}, diff_mode: {support: none}, idempotent: {support: full}}
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

import hashlib
import json
import os
import time
import traceback

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.gpulab.lab.plugins.module_utils import docker_api as api
from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import BackupError, Progress
from ansible_collections.gpulab.lab.plugins.module_utils.backup.docker_save import (
    ArchiveError,
    inspect_archive,
    open_tar_stream,
    sniff_format,
    suffix_format,
)
from ansible_collections.gpulab.lab.plugins.module_utils.files import file_sha256


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
    progress = Progress(p["progress_file"], bytes_total=os.path.getsize(path))
    if p["sha256"]:
        want = p["sha256"].strip().lower()
        want = want[len("sha256:") :] if want.startswith("sha256:") else want
        got = known.get("sha256") or file_sha256(path, progress)[len("sha256:") :]
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
            progress.figures["bytes_total"] = 0
        layout, ids, tags, tar_bytes = inspect_archive(path, fmt, progress)
        result.update(layout=layout, image_ids=ids, repo_tags=tags, tar_bytes=tar_bytes)
    keep = ("format", "layout", "image_ids", "repo_tags", "tar_bytes", "sha256")
    cache.write({k: result[k] for k in keep if k in result})
    progress.figures["bytes_total"] = result["tar_bytes"]
    return progress


def run_module(module):
    p = module.params
    path = p["path"]
    result = {"changed": False, "path": path, "missing_ids": [], "seconds": 0.0}
    progress = check_archive(p, result)
    fmt, ids, tar_bytes = result["format"], result["image_ids"], result["tar_bytes"]
    if p["inspect_only"]:
        return result

    engine = api.Engine(p["docker_host"], p["timeout"] or None)
    missing = [i for i in dict.fromkeys(ids) if not engine.has_image(i)]
    result["missing_ids"] = missing
    if not missing:
        return result
    result["changed"] = True
    if module.check_mode:
        return result

    def sent(count, finished):  # once every byte is sent, the engine unpacks the layers until it answers
        progress("unpacking" if finished else "load", count, force=finished)

    started = time.monotonic()
    stream = open_tar_stream(path, fmt)
    try:
        messages, _sent = engine.load(stream, sent)
    finally:
        stream.close()
    result["seconds"] = round(time.monotonic() - started, 1)
    progress("done", tar_bytes, force=True)
    progress.remove()
    result["messages"] = messages
    still = [i for i in missing if not engine.has_image(i)]
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
    except (BackupError, api.DockerApiError) as e:  # an ArchiveError, zstd's, or the engine's
        module.fail_json(msg=str(e), path=module.params["path"])
    except Exception as e:
        module.fail_json(msg=f"Unexpected error with {module.params['path']}: {e}", exception=traceback.format_exc())
    module.exit_json(**result)


if __name__ == "__main__":
    main()
