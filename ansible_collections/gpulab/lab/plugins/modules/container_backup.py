#!/usr/bin/python
# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""Back up a Docker container (its file system, run settings and bind-mounted work directory) into gpulab's
content-addressed backup store on the server, incrementally.

Why gpulab writes its own module: no Ansible module does `docker commit` (community.docker has none), and none keeps
backups in a store where each layer is written once: by hand, a backup is `docker commit -p` + `docker save -o`, the
whole 10+ GB image every time, without the work directory (commit never captures bind mounts) and without the ports,
GPUs and environment the container ran with. This module commits the container (paused, through the Docker API),
reads the `docker save` stream in chunks (no 60 s read timeout, never in memory; legacy and OCI layouts), stores each
layer once as a zstd-compressed blob named by its sha256 (written atomically: temporary file, fsync, rename), archives
the bind-mount sources, and writes a manifest last.
The fast path (issue 7): on overlay2, once the layers of the container's image are in the store, it reads the
container's writable layer straight from its upper directory (paused only while it is read) instead of commit + save,
and stores it as content-defined chunks (module_utils/backup/overlay.py), so a backup costs time and bytes in
proportion to what changed, not to the image. Retention keeps the newest backups per container and removes blobs
no backup references. An image nearing Docker's 125-layer limit is flattened instead of failing one day.
The code lives in the package module_utils/backup/ (backup.py, sources.py; its options in options.py), which the role
backup's systemd timer runs without Ansible (cli.py).
Python's standard library only (3.8 or newer) and the zstd and tar programs on the server.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: container_backup
short_description: Back up a Docker container into gpulab's incremental, content-addressed backup store
version_added: "0.1.0"
description:
  - "Two ways to read the container (RV(path_taken) says which, RV(path_reason) why not the fast one):"
  - "C(overlay-upperdir), the fast path: when the container runs on Docker's overlay2 storage driver and O(fast_path)
    is on, the container's writable layer is read straight from its overlay upper directory (C(docker inspect):
    GraphDriver.Data.UpperDir), with the container paused (frozen) only while it is read, and written as a layer tar
    (overlay whiteouts and opaque directories become C(.wh.) entries; owners, modes, links, xattrs kept). The layer is
    cut into content-defined chunks at file boundaries, each stored once by its hash, so a backup after a small change
    reads the writable layer and writes little more than the change. The image's own layers come from the store; when
    it lacks some, the image (not the container: no commit, no pause) is saved into the store first, once."
  - "C(commit-save), the fallback: another storage driver, Docker's containerd image store, an upper directory the
    module cannot read (not root, an engine on another machine), overlay features a layer cannot represent
    (metacopy, redirect_dir), O(fast_path=false): the container is committed (paused while Docker commits, unless
    O(pause=false)) through the Docker API, the committed image is read from C(docker save) in chunks and each layer
    is stored as a blob named by the sha256 of its content, compressed with zstd. A layer the store already has is not
    written again."
  - With O(include_workdir) (the default), the sources of the container's bind mounts (the notebook's work directory,
    its Jupyter config) are archived too, with owners, modes and extended attributes; an unchanged source is not
    archived again. Sockets, devices and system paths (C(/proc), C(/sys), C(/dev), C(/run), C(/var/lib/docker), ...)
    are skipped, and the result says so.
  - The manifest (C(<store>/backups/<container>/<id>.json)) is written last, with the image config, the layers with
    their checksums, the container's run settings (command, env without secret values, ports with host IPs, mounts,
    GPU device requests, restart policy, ipc mode, limits, labels, user, working dir) and the archives. A backup
    without a manifest does not exist; what a killed backup left is removed by the next one. Backups take an
    exclusive lock on the store.
  - A backup that fails (a full disk, for example) or is stopped thaws what it paused and removes its temporary
    files before it reports; its message names the path and, on a full disk, the space free and the space needed.
    The earlier backups are left as they were.
  - Retention keeps the newest O(keep_last) backups of the container (and the newest complete one in any case) and
    removes every blob no remaining backup references.
  - Each backup commit adds a layer to the image a restored container runs on. When the committed image would have
    O(flatten_threshold) layers or more, the container's file system is exported as one layer instead (the result
    says C(flattened)), so that it never reaches Docker's limit of 125 layers.
  - Environment variables whose names match O(secret_env) and that the container set itself are left out of the
    manifest and of the stored image config; container_restore asks for their values.
  - O(format=docker-archive) writes instead one plain tar to O(archive_path) that C(docker load -i) reads, with
    gpulab's run settings and bind-mount archives as extra members.
author:
  - gpulab developers (!UNKNOWN)
options:
  container:
    description: Name of the container to back up.
    type: str
    required: true
  store:
    description:
      - The backup store, a folder on the server (created with mode 0700 when missing). Required with
        O(format=store).
    type: path
  keep_last:
    description: Backups of this container to keep in the store; older ones are removed after a successful backup.
    type: int
    default: 3
  include_workdir:
    description: Archive the sources of the container's bind mounts (work directory, config files).
    type: bool
    default: true
  pause:
    description: Pause the container while it is read (its upper directory on the fast path), committed or exported.
    type: bool
    default: true
  format:
    description: C(store) (incremental, into O(store)) or C(docker-archive) (one plain tar at O(archive_path)).
    type: str
    choices: [store, docker-archive]
    default: store
  archive_path:
    description: The tar file written with O(format=docker-archive) (atomically; an existing file is replaced).
    type: path
  flatten_threshold:
    description:
      - Layer count at which the committed image is flattened into one layer instead (Docker refuses more than 125).
        V(0) never flattens.
    type: int
    default: 100
  secret_env:
    description: Name patterns (shell-style, case-insensitive) of environment variables whose values are not stored.
    type: list
    elements: str
    default: ["*TOKEN*", "*PASSWORD*", "*PASSWD*", "*SECRET*", "*API_KEY*", "*APIKEY*", "*PRIVATE_KEY*", "*CREDENTIAL*"]
  compression_level:
    description:
      - zstd level of the blobs, V(1) (fast) to V(19) (small), or V(-1) to V(-7) for zstd's faster C(--fast=N) levels.
      - The default, C(--fast=1), keeps a first backup close to the time of C(docker save) on a loaded 2-core server
        and stores a deep-learning image in about 45 % of its size; V(3) stores it in about 38 %, at twice the CPU.
    type: int
    default: -1
  timeout:
    description: Seconds to wait for each read from the engine; V(0) waits for ever (a multi-GB save takes minutes).
    type: int
    default: 0
  progress_file:
    description: File the progress is written to as JSON (phase, seconds, bytes read and written), for async callers.
    type: path
  fast_path:
    description:
      - Read the writable layer from the overlay2 upper directory when the engine allows it (see the description);
        V(false) always commits and saves.
    type: bool
    default: true
  full_read_days:
    description:
      - A work directory is read incrementally (only its files whose metadata changed since the previous backup);
        after this many days a backup reads every file again, in case metadata lied. V(0) never does.
    type: int
    default: 7
extends_documentation_fragment: [gpulab.lab.attributes, gpulab.lab.attributes.idempotent, gpulab.lab.docker]
attributes: {check_mode: {support: full}, diff_mode: {support: none}, idempotent: {support: none}}
notes:
  - Every run makes a new backup (changed); a run in check mode says what it would commit, store and remove.
  - Named volumes and tmpfs mounts are not backed up (listed in RV(skipped_mounts)).
"""

EXAMPLES = r"""
---
- name: Back up the notebook of alice
  container_backup:
    container: alice-notebook
    store: /var/backups/gpulab
    keep_last: 3

- name: One tar to carry away
  container_backup:
    container: alice-notebook
    format: docker-archive
    archive_path: /srv/export/alice-notebook.tar
"""

RETURN = r"""
---
backup_id:
  description: The new backup's ID (sortable by time).
  type: str
  returned: success, not in check mode
  sample: 20250131T235959.123Z-1a2b3c
manifest:
  description: Path of the backup's manifest in the store.
  type: str
  returned: success, not in check mode
path_taken:
  description: How the container was read, C(overlay-upperdir) (the fast path), C(commit-save) or C(export-flatten).
  type: str
  returned: always
path_reason:
  description: Why the fast path was not taken (null when it was).
  type: str
  returned: always
base_image_stored:
  description: Whether the layers of the container's image were saved into the store first (the fast path's first run).
  type: bool
  returned: always
chunks_new:
  description: Chunks of the writable layer written to the store (fast path).
  type: int
  returned: always
chunks_reused:
  description: Chunks of the writable layer the store already had (fast path).
  type: int
  returned: always
paused_seconds:
  description: Seconds the container was paused while its upper directory was read (fast path).
  type: float
  returned: always
bytes_read:
  description:
    - Bytes read from the engine's save (or export) stream, or on the fast path the writable layer's tar read from its
      upper directory (and the image's save stream when the image was stored first), and from the bind-mount sources.
  type: int
  returned: always
bytes_written:
  description: Bytes written into the store (compressed new blobs and the manifest), or the archive's size.
  type: int
  returned: always
layers_new:
  description: Layers written to the store by this backup (in check mode, the layers not yet in the store).
  type: int
  returned: always
layers_reused:
  description: Layers the store already had, so not written again.
  type: int
  returned: always
seconds:
  description: Duration of the backup.
  type: float
  returned: always
image_id:
  description: ID of the image the backup restores to (the sha256 of its stored config).
  type: str
  returned: success, not in check mode
layer_count:
  description: Layers of the backed-up image.
  type: int
  returned: always
flattened:
  description: Whether the image was flattened into one layer (its layer count had reached O(flatten_threshold)).
  type: bool
  returned: always
removed_backups:
  description: IDs of the backups retention removed (in check mode, would remove).
  type: list
  elements: str
  returned: always
removed_blobs:
  description: Digests of the blobs removed because no backup references them any more.
  type: list
  elements: str
  returned: always
mounts:
  description: The bind-mount sources archived (source, destination, kind, size, reused).
  type: list
  elements: dict
  returned: always
skipped_mounts:
  description: Mounts not archived, each with the reason.
  type: list
  elements: dict
  returned: always
secret_env_left_out:
  description: Names of the environment variables whose values were not stored.
  type: list
  elements: str
  returned: always
store_bytes:
  description: Size of the store on disk after the backup.
  type: int
  returned: success with format store, not in check mode
run_settings:
  description: The container's saved run settings (what container_restore creates it with), secret values left out.
  type: dict
  returned: always
notices:
  description:
    - Things the backup did or met that the user should know (flattening, files changed while archived, ...), among
      them the blobs it stored again from their source after they were found corrupt, and the backups of the
      container still damaged.
  type: list
  elements: str
  returned: always
backups:
  description:
    - The container's backups in the store after this one, oldest first, as C(list) of the backup command line shows
      them - C(backup_id), C(created), C(complete), C(damaged) with C(lacks) (what each damaged backup lacks, and why),
      and C(last_verified) (UTC time at which the scrub last verified every blob of the backup; null when it has not
      yet).
  type: list
  elements: dict
  returned: success with format store, not in check mode
damaged_backups:
  description: IDs of the container's backups that are damaged (their RV(backups) entries say what each lacks).
  type: list
  elements: str
  returned: success with format store, not in check mode
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.gpulab.lab.plugins.module_utils.backup import options, scrub
from ansible_collections.gpulab.lab.plugins.module_utils.backup.backup import BackupJob
from ansible_collections.gpulab.lab.plugins.module_utils.backup.module import run_job
from ansible_collections.gpulab.lab.plugins.module_utils.backup.store import Store


def main():
    module = AnsibleModule(
        argument_spec=options.argument_spec(options.BACKUP),
        required_if=[(k, v, list(names)) for k, v, names in options.BACKUP_REQUIRED_IF],
        supports_check_mode=True,
    )

    def backup():
        job = BackupJob(**module.params)
        if module.check_mode:
            return job.plan()
        result = job.run()
        if module.params["format"] == "store":
            backups = scrub.listing(Store(module.params["store"]), module.params["container"])
            result.update(backups=backups, damaged_backups=[b["backup_id"] for b in backups if b["damaged"]])
        return result

    run_job(module, "backing up", backup)


if __name__ == "__main__":
    main()
