# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""The vocabulary every part of the backup shares: its error, the store's format name, names and digests, backup ids
and tags, and the progress record an async caller reads.

Nothing here reads the store, a stream or the engine. Standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time

from ansible_collections.gpulab.lab.plugins.module_utils.docker_api import ProgressFile

CHUNK = 1024 * 1024
FORMAT = "gpulab-backup"
FORMAT_VERSION = 1
DEFAULT_LEVEL = -1  # zstd --fast=1
DEFAULT_FLATTEN_THRESHOLD = 100
DOCKER_MAX_LAYERS = 125
TAG_REPO = "gpulab-backup"
RESTORED_LABEL = "io.gpulab.backup.restored-from"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
VERIFY_MODES = ("content", "full", "stored")


class BackupError(Exception):
    """A backup, restore or archive gpulab refuses or could not do, with a message the user can act on."""


def now_utc():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def new_backup_id():
    """Sortable by time (to the millisecond), unique: 20250131T235959.123Z-1a2b3c."""
    now = time.time()
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z-" + os.urandom(3).hex()


def check_name(value, what):
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise BackupError(
            f"{what} {value!r} is not valid: letters, digits, '_', '.' and '-', starting with a letter or digit"
        )
    return value


def sha256_of(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def backup_tag(container, backup_id):
    """(repository, tag) of a restored image: gpulab-backup/<container>:<backup id>, as Docker's grammar allows."""
    component = re.sub(r"[^a-z0-9]+", "-", container.lower()).strip("-") or "container"
    return f"{TAG_REPO}/{component}", backup_id


class Progress:
    """A long run's progress for an async caller: {phase, seconds, figures...} in a JSON file, at most once a second.

    Called as progress(phase, done, force) it is the callback of a byte counter: the phase and bytes_done."""

    def __init__(self, path=None, **figures):
        self.file = ProgressFile(path)
        self.phase = "start"
        self.figures = dict(figures)
        self.timings = {}  # seconds spent in each phase
        self.mark = time.monotonic()

    def set(self, phase, **figures):
        now = time.monotonic()
        self.timings[self.phase] = round(self.timings.get(self.phase, 0.0) + now - self.mark, 2)
        self.mark = now
        self.phase = phase
        self.figures.update(figures)
        self.file.write(phase, force=True, **self.figures)

    def update(self, force=False, **figures):
        self.figures.update(figures)
        self.file.write(self.phase, force=force, **self.figures)

    def __call__(self, phase, done, force=False):
        self.phase = phase
        self.update(force, bytes_done=done)

    def remove(self):
        """The run is over: the file goes; returns the seconds spent in each phase."""
        self.set("done")
        with contextlib.suppress(OSError):
            self.file.remove()
        return {k: v for k, v in self.timings.items() if k != "done"}
