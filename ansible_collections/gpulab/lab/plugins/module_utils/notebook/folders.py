# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""A student's folders and Jupyter config files on the server, as role notebook's file and copy tasks made them:
a missing parent of the workdir (root, 0755), the workdir (the student's, 0750), the config folder (the student's,
0500) with the JSON config that holds the token or password hash and the log filter, both the student's, 0400.
Files are replaced atomically (a temporary file beside them, then rename). In check mode nothing is written; each
function returns what it changed (or would change), never a file's content (the JSON holds secrets).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile


def ensure_folder(path, uid, gid, mode, check_mode):
    """The folder with that owner and mode (created when missing, its parents must exist); what changed, as words."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not check_mode:
            os.mkdir(path, mode)
            os.chown(path, uid, gid)
            os.chmod(path, mode)
        return [f"{path} created"]
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(f"{path} exists and is not a folder")
    return _owner_and_mode(path, st, (uid, gid, mode), check_mode)


def _owner_and_mode(path, st, wanted, check_mode):
    """Set the owner and mode of an existing path (st: its lstat) to wanted (uid, gid, mode); what changed."""
    uid, gid, mode = wanted
    changes = []
    if (st.st_uid, st.st_gid) != (uid, gid):
        changes.append(f"{path} owner {st.st_uid}:{st.st_gid} -> {uid}:{gid}")
        if not check_mode:
            os.chown(path, uid, gid)
    if stat.S_IMODE(st.st_mode) != mode:
        changes.append(f"{path} mode {stat.S_IMODE(st.st_mode):04o} -> {mode:04o}")
        if not check_mode:
            os.chmod(path, mode)
    return changes


def ensure_file(path, content, uid, gid, *, mode, check_mode):
    """The file with that content, owner and mode; what changed, as words (never the content)."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    try:
        st = os.lstat(path)
        with open(path, "rb") as f:
            same = stat.S_ISREG(st.st_mode) and f.read() == data
    except FileNotFoundError:
        st, same = None, False
    if not same:
        if not check_mode:
            _write(path, data, uid, gid, mode)
        return [f"{path} {'written' if st is None else 'changed'}"]
    return _owner_and_mode(path, st, (uid, gid, mode), check_mode)


def _write(path, data, uid, gid, mode):
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".gpulab-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chown(tmp, uid, gid)
        os.chmod(tmp, mode)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_folder(path, check_mode):
    """The folder and what it holds removed; what changed."""
    if not os.path.lexists(path):
        return []
    if not check_mode:
        shutil.rmtree(path)
    return [f"{path} removed"]


def student_files(user, config, log_filter, check_mode):
    """Everything a started or stopped student's notebook needs on the server; returns (changes, config_changed):
    config_changed when a file Jupyter reads changed (the container then restarts, so that Jupyter reads it)."""
    uid, gid = int(user["uid"]), int(user["gid"])
    workdir, config_dir = user["workdir"], user["config_dir"]
    changes = []
    parent = os.path.dirname(workdir)
    if not os.path.isdir(parent):  # root's, 0755: the workdir's owner and mode would not suit a shared folder
        if not check_mode:
            os.makedirs(parent, 0o755, exist_ok=True)
            os.chmod(parent, 0o755)  # noqa: S103 (a parent folder others traverse, as role notebook always made it)
        changes.append(f"{parent} created")
    changes += ensure_folder(workdir, uid, gid, 0o750, check_mode)
    changes += ensure_folder(config_dir, uid, gid, 0o500, check_mode)
    files = []
    for name, content in ((user["config_file"], config), (user["log_filter_file"], log_filter)):
        files += ensure_file(os.path.join(config_dir, name), content, uid, gid, mode=0o400, check_mode=check_mode)
    return changes + files, bool(files)
