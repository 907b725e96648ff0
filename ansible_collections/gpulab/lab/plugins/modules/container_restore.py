#!/usr/bin/python
# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""Restore a Docker container from gpulab's backup store: verify, load the image, put the work directory back, and
create the container again with the settings it ran with.

Why gpulab writes its own module: the store that container_backup writes (content-addressed, zstd-compressed layer
blobs and a manifest per backup) is gpulab's own; no Ansible module reads it. community.docker.docker_image_load needs
a finished tar file (the store would have to be unpacked into a second multi-GB copy first) and checks no checksum;
docker_container cannot take "the settings this container had" from a backup. This module checks every blob of the
backup before Docker changes: presence, size and sha256 of each stored file before the engine is asked for anything,
the sha256 of each layer's content as it streams (the engine creates nothing until the tar's last member, which is
sent only when every layer matched); a damaged or missing blob is an error naming it, and the engine's images and
containers stay as they were. It streams a `docker load` tar assembled from the blobs into the engine's API in chunks,
with no read timeout and without holding the image in memory (layers the engine has are not sent), unpacks the
bind-mount sources with their owners and modes, and creates and starts the container with its saved run settings
(name, command, env, ports with host IPs, mounts, GPU device requests, restart policy, ipc mode, shm size, memory,
cpus, labels, user, working dir).
The code lives in the package module_utils/backup/ (restore.py, verify.py; its options in options.py). Python's
standard library only (3.8 or newer) and the zstd and tar programs on the server.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: container_restore
short_description: Restore a Docker container, its image and its work directory from gpulab's backup store
version_added: "0.1.0"
description:
  - Takes the backup O(backup) of O(container) in O(store), or else the newest one, and verifies every blob it
    references before Docker or a file is changed (present, the size and sha256 of the stored file, and the sha256
    of the content it decompresses to; see O(verify)). A missing or damaged blob is an error that names it, and the
    engine's images and containers and the work directory stay as they were.
  - Never restores an older backup on its own. When the newest backup cannot be restored (a blob missing or
    damaged, its manifest truncated or unreadable, or blobs of a later backup run on disk whose manifest is missing)
    the module fails, naming what is missing and the complete backups by id; one of them is restored when O(backup)
    names it. A run that was interrupted while writing (its temporary files in the store) never completed and is no
    backup; the newest backup is restored, with a notice.
  - Loads the image by streaming a C(docker load) tar assembled from the blobs into the engine (layers the engine
    already has, for example those of the deep-learning image after a reinstall, are not sent again) and tags it
    C(gpulab-backup/<container>:<backup id>). An image already in the engine is only tagged.
  - With O(restore_workdir) (the default), puts the archived bind-mount sources back where they were, exactly as the
    backup has them, with their owners, modes and extended attributes. Files in both are replaced by the backup's.
    What the backup does not have (newer files and folders, or a path of another kind) is not deleted but moved to
    C(<source>.gpulab-moved-<UTC time>/) beside it (the source's owner, mode 0700), keeping its path there; the
    result (RV(workdir_moved_aside)) and a notice say where.
  - Creates the container with its saved run settings, labels it C(io.gpulab.backup.restored-from=<backup id>) and
    starts it if it was running when it was backed up.
  - An existing container of the same name, without O(force=true), is left alone when it was restored from this
    backup already, or is the container the backup was taken from (it existed under that name, on the same image, when
    the backup was made) and O(backup) is not given; the module says so and changes nothing.
  - A fresh notebook container that gpulab created and whose student changed nothing in it is replaced without
    O(force) (what C(site.yml) makes on a reinstalled server before the restore). Fresh, strictly - labelled by role
    notebook, not restored, on the very image the lab configured for it, its writable layer holding only what
    Jupyter's start and the engine write (Jupyter's runtime folder C(/tmp/jupyter-runtime), the mount points), its
    read-write bind mounts (the work directory) only the empty folder C(.ipython) IPython makes there. It is checked
    again just before it is removed.
  - Any other existing container is refused without O(force) - the module fails, naming the container and what it
    holds, and says how to force; nothing is changed. With O(force=true) it is removed (after the image is loaded) and
    created again.
  - Takes a shared lock on the store, so that no backup removes blobs while they are read.
author:
  - gpulab developers (!UNKNOWN)
options:
  store:
    description: The backup store on the server.
    type: path
    required: true
  container:
    description: Name of the backed-up container (it is created again under this name).
    type: str
    required: true
  backup:
    description: ID of the backup to restore; the newest backup when omitted (which must be complete).
    type: str
  force:
    description: Replace an existing container of that name.
    type: bool
    default: false
  restore_workdir:
    description: Unpack the archived bind-mount sources (work directory, config files).
    type: bool
    default: true
  keep_present_mounts:
    description:
      - Leave a bind-mount source that holds files on the server (anything but the empty folders Jupyter's start
        makes) as it is, and unpack only the missing or empty ones. Its files are the student's live work, newer than
        the backup; RV(workdir_kept) names them.
      - Role backup's automatic restore of a missing notebook (C(site.yml), its C(backup_auto_restore)) sets it; an
        explicit restore (C(restore.yml)) puts every source back as the backup has it.
    type: bool
    default: false
  verify_only:
    description: Only verify the backup (every checksum); do not talk to Docker.
    type: bool
    default: false
  verify:
    description:
      - What is checked, besides every blob's presence, size and the sha256 of its stored file (always, before
        Docker is touched).
      - V(content) (default) also checks the sha256 of the content of the bind-mount archives before anything
        changes, and of each layer as it streams into the engine; the tar's last member, without which the engine
        creates no image, is sent only when every layer matched, so a mismatch leaves the engine as it was.
      - V(full) checks the content of every blob before Docker is touched (every blob is decompressed twice).
      - V(stored) checks no content digest itself (zstd's frame checksums and the engine's own layer digests still
        apply while loading).
      - O(verify_only=true) always checks in full.
    type: str
    choices: [content, full, stored]
    default: content
  env:
    description:
      - Environment variables set on the restored container, over the saved ones. Must give the values of the
        variables the backup left out as secrets.
    type: dict
  start:
    description: Start the container after creating it; by default, when it was running at the backup.
    type: bool
  timeout:
    description: Seconds to wait for each read from the engine; V(0) waits for ever.
    type: int
    default: 0
  progress_file:
    description: File the progress is written to as JSON (phase, seconds, bytes verified and sent), for async callers.
    type: path
extends_documentation_fragment: [gpulab.lab.attributes, gpulab.lab.attributes.idempotent, gpulab.lab.docker]
attributes: {check_mode: {support: full}, diff_mode: {support: none}, idempotent: {support: full}}
notes:
  - In check mode the blobs are checked for presence and size only.
  - Idempotent in that a second run finds the container and leaves it alone (unless O(force=true)).
"""

EXAMPLES = r"""
---
- name: Rebuild the notebook of alice from the newest backup
  container_restore:
    store: /var/backups/gpulab
    container: alice-notebook

- name: Restore an older backup, asked for by its id (the newest is never skipped on its own)
  container_restore:
    store: /var/backups/gpulab
    container: alice-notebook
    backup: 20250130T235959.123Z-9f8e7d
    force: true

- name: Check a backup without touching Docker
  container_restore:
    store: /var/backups/gpulab
    container: alice-notebook
    backup: 20250131T235959.123Z-1a2b3c
    verify_only: true
"""

RETURN = r"""
---
backup_id:
  description: The backup restored (or verified).
  type: str
  returned: always
manifest:
  description: Path of its manifest.
  type: str
  returned: always
image:
  description: The name the restored image is tagged with.
  type: str
  returned: always
  sample: gpulab-backup/alice-notebook:20250131T235959.123Z-1a2b3c
image_id:
  description: ID of the restored image.
  type: str
  returned: always
verified:
  description: What was verified before Docker was touched, C(content), C(full), C(stored), or C(sizes) (check mode).
  type: str
  returned: always
verified_blobs:
  description: Number of blobs verified.
  type: int
  returned: always
verified_bytes:
  description: Bytes of stored files whose sha256 was verified.
  type: int
  returned: always
verified_content_bytes:
  description: Uncompressed bytes whose sha256 was verified (before Docker, or while streaming with V(content)).
  type: int
  returned: always
image_loaded:
  description: Whether the image was streamed into the engine (false when it was there and only tagged).
  type: bool
  returned: always
layers_sent:
  description: Layers sent to the engine.
  type: int
  returned: always
layers_present:
  description: Layers the engine already had (sent as empty placeholders, or not at all).
  type: int
  returned: always
bytes_sent:
  description: Bytes of the docker load tar sent to the engine.
  type: int
  returned: always
workdir_restored:
  description: Bind-mount sources unpacked.
  type: list
  elements: str
  returned: always
workdir_moved_aside:
  description: For each bind-mount source that held paths the backup does not have, where they were moved.
  type: list
  elements: dict
  returned: always
  contains:
    source:
      description: The bind-mount source.
      type: str
    moved_to:
      description: The folder beside it the paths were moved to.
      type: str
      sample: /srv/notebooks/alice.gpulab-moved-20250131T235959Z
    paths:
      description: The paths moved, relative to the source (a folder moved whole is one path).
      type: list
      elements: str
workdir_kept:
  description: Bind-mount sources left as the server has them (O(keep_present_mounts)).
  type: list
  elements: str
  returned: always
replaced_container:
  description: Whether an existing container of that name was removed (O(force=true), or a fresh one).
  type: bool
  returned: always
replaced_fresh:
  description: Whether the container removed was a fresh notebook that held no change of its student's (no O(force)).
  type: bool
  returned: always
container_exists:
  description: True when an existing container was left alone (restored from this backup, or its source).
  type: bool
  returned: when it was
container_id:
  description: ID of the created container.
  type: str
  returned: when a container was created
container_started:
  description:
    - Whether the container was started.
    - Not C(started), which Ansible's async machinery reserves; a module result with C(started) never reads as
      finished to C(async_status).
  type: bool
  returned: always
seconds:
  description: Duration of the restore.
  type: float
  returned: always
notices:
  description: Things the user should know (paths moved aside, an interrupted backup run, a damaged older manifest).
  type: list
  elements: str
  returned: always
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.gpulab.lab.plugins.module_utils.backup import options
from ansible_collections.gpulab.lab.plugins.module_utils.backup.module import run_job
from ansible_collections.gpulab.lab.plugins.module_utils.backup.restore import RestoreJob


def main():
    module = AnsibleModule(argument_spec=options.argument_spec(options.RESTORE), supports_check_mode=True)
    run_job(module, "restoring", lambda: RestoreJob(**module.params).run(check_mode=module.check_mode))


if __name__ == "__main__":
    main()
