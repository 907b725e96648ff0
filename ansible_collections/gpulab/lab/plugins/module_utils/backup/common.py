# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""The vocabulary every part of the backup shares: its errors (BackupError, Stopped, an OSError told with its path and
the free space), the store's format name, names and digests, backup ids and tags, and the progress record an async
caller reads.

Nothing here reads the store, a stream or the engine. Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
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
# Role notebook's label of a student's notebook container (its value: the student). Defined here because the timer runs
# this package on its own on the server; module_utils/notebook/ and lab_status take it from here.
NOTEBOOK_USER_LABEL = "io.gpulab.notebook.user"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
VERIFY_MODES = ("content", "full", "stored")


class BackupError(Exception):
    """A backup, restore or archive gpulab refuses or could not do, with a message the user can act on."""


class Stopped(BaseException):  # like KeyboardInterrupt: no `except Exception` takes it
    """The run was asked to stop (SIGTERM, SIGINT: `systemctl stop`); raised in the main thread by the command line's
    signal handler, so that every `with` and `finally` on the way out thaws and removes what it made."""

    def __init__(self, signame):
        super().__init__(signame)
        self.signame = signame
        self.told = False  # the command line has said what was stopped


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def size_text(size):
    """1536 -> '1.5 KiB'."""
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} bytes"  # not reached


def free_bytes(path):
    """Free bytes on the disk of path (or of its nearest existing parent); None when that cannot be asked."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def os_error_text(e, path=None, needed=None):
    """An OSError as the admin can act on it: its reason, the path (the error's own, else path), and on a full disk
    the space free there and, when known, the space needed (bytes)."""
    where = getattr(e, "filename", None) or path
    text = (e.strerror or str(e)) + (f": {where}" if where else "")
    if e.errno in DISK_FULL and where:
        free = free_bytes(where)
        wants = f"; free at least {size_text(needed)} more" if needed else "; free space there"
        text += f" ({size_text(free) if free is not None else 'unknown'} free on that disk{wants})"
    return text


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
