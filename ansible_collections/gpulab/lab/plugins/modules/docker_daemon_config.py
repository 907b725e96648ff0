#!/usr/bin/python
# Copyright (c) gpulab developers
# MIT License (see pyproject.toml)
# Ansible module layout: imports follow DOCUMENTATION/EXAMPLES/RETURN (validate-modules wants it so).
"""Merge keys into Docker's daemon.json instead of overwriting the whole file.

/etc/docker/daemon.json is shared: admins edit it by hand, the NVIDIA Container Toolkit adds its runtime, other tools
add registry mirrors or log settings. NVIDIA's Ansible role and geerlingguy's docker role template the file as a whole,
so every run silently drops settings that someone else made. No module of ansible-core, community.docker or
community.general merges a JSON file key by key with validation, hence this module: it changes only the keys it is
given, keeps every other key (and the key order) as it was, validates the result with ``dockerd --validate`` where the
installed Docker supports it, and writes the file atomically.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: docker_daemon_config
short_description: Merge settings into Docker's daemon.json without losing other keys
version_added: "0.1.0"
description:
  - Merges the given keys into Docker's C(/etc/docker/daemon.json) and leaves every other key as it was.
  - The file is shared by admins and other tools (for example the NVIDIA Container Toolkit). NVIDIA's Ansible role
    and geerlingguy's docker role overwrite the file as a whole, so users lose settings made by someone else. This
    module exists because no module of ansible-core, community.docker or community.general merges a JSON file key
    by key with validation.
  - Nested objects (for example C(log-opts) or C(runtimes)) are merged key by key. Any other value (lists, strings,
    numbers, booleans) replaces the existing value. A value of V(null) removes the key.
  - Whether the file changes is decided by comparing the parsed data, not the text, so a hand-formatted file that
    already holds the values is not rewritten. When it is rewritten, existing keys keep their order and new keys are
    appended; the file is written as JSON indented by two spaces.
  - A missing file, or a file holding only whitespace, counts as an empty object. A file with invalid JSON, or JSON
    that is not an object, makes the module fail without touching the file.
  - The new content is written to a temporary file in the same directory, synced to disk and renamed over the old
    file, so readers never see a half-written file.
  - The file is owned by C(root:root) when the module runs as root; otherwise ownership is left as it is.
  - Docker reads C(daemon.json) only when it starts; restart the C(docker) service (for example from a handler) for
    the change to take effect.
author: gpulab developers
extends_documentation_fragment:
  - gpulab.lab.attributes
  - gpulab.lab.attributes.idempotent
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  idempotent:
    support: full
options:
  path:
    description:
      - Path of the Docker daemon configuration file.
      - Its parent directory is created with mode C(0755) if it does not exist.
    type: path
    default: /etc/docker/daemon.json
  config:
    description:
      - Keys to merge into the file.
      - Nested dictionaries are merged recursively, key by key. Lists and scalar values replace the existing value.
      - A value of V(null) removes that key from the file, at any nesting level. This lets a role undo a setting, for
        example C(default-runtime) set to V(null).
    type: dict
    required: true
  backup:
    description:
      - When the file changes, keep a timestamped copy of the previous file next to it.
    type: bool
    default: true
  validate:
    description:
      - Validate the new content with C(dockerd --validate --config-file <tempfile>) before writing it.
      - Validation runs only when a C(dockerd) binary is found and it supports C(--validate) (Docker 23 and later).
        Otherwise, for example with Debian 12's C(docker.io) 20.10, it is skipped silently and RV(validated) is
        V(false).
      - If validation fails, the module fails with dockerd's message and the file is left untouched.
    type: bool
    default: true
  mode:
    description:
      - Permissions of the file, as for M(ansible.builtin.file), in octal (V('0644')) or symbolic form.
    type: raw
    default: '0644'
notes:
  - Docker reads the file only at start; notify a handler that restarts C(docker) when this module reports a change.
seealso:
  - name: Docker daemon configuration file
    description: Reference of the keys Docker accepts in daemon.json.
    link: https://docs.docker.com/reference/cli/dockerd/#daemon-configuration-file
"""

EXAMPLES = r"""
- name: Make the NVIDIA runtime the default, keeping everything else in daemon.json
  docker_daemon_config:
    config:
      default-runtime: nvidia
      runtimes:
        nvidia:
          path: nvidia-container-runtime
          args: []
  notify: Restart docker

- name: Rotate container logs
  docker_daemon_config:
    config:
      log-driver: json-file
      log-opts:
        max-size: 100m
        max-file: "3"
  notify: Restart docker

- name: Undo a setting made earlier
  docker_daemon_config:
    config:
      default-runtime: null
  notify: Restart docker

- name: Write a different file, without backup
  docker_daemon_config:
    path: /srv/docker-rootless/daemon.json
    backup: false
    mode: '0600'
    config:
      live-restore: true
"""

RETURN = r"""
path:
  description: Path of the configuration file.
  returned: always
  type: str
  sample: /etc/docker/daemon.json
config:
  description: The full content of the file after the merge (in check mode, the content it would have).
  returned: always
  type: dict
  sample:
    default-runtime: nvidia
    live-restore: true
    runtimes:
      nvidia:
        path: nvidia-container-runtime
        args: []
changed_keys:
  description: Sorted list of the top-level keys whose value was changed, added or removed.
  returned: always
  type: list
  elements: str
  sample: [default-runtime, runtimes]
backup_file:
  description: Path of the copy of the previous file.
  returned: when the file changed, O(backup=true) and the file existed before
  type: str
  sample: /etc/docker/daemon.json.12345.2025-01-31@12:00:00~
validated:
  description:
    - Whether the new content was checked with C(dockerd --validate).
    - V(false) when nothing had to be written, when O(validate=false), or when no C(dockerd) supporting C(--validate)
      was found.
  returned: always
  type: bool
  sample: false
diff:
  description: The file content before and after, when run with C(--diff).
  returned: when diff mode is on
  type: dict
"""

import copy
import json
import os
import tempfile
import traceback

from ansible.module_utils.basic import AnsibleModule

DEFAULT_PATH = "/etc/docker/daemon.json"
DEFAULT_MODE = "0644"
DIR_MODE = 0o755


class DaemonConfigError(Exception):
    """A problem with the file that the user has to fix; the message is meant for them."""


def json_equal(a, b):
    """Compare parsed JSON values strictly.

    Python's ``==`` says ``True == 1 == 1.0``, but Docker (Go) tells ``true``, ``1`` and ``1.0`` apart, so the types of
    scalars must match too. Key order of objects does not matter; order of lists does.
    """
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def strip_nulls(value):
    """Return ``value`` with every dict entry whose value is None removed, recursively (lists are left as they are)."""
    if isinstance(value, dict):
        return {k: strip_nulls(v) for k, v in value.items() if v is not None}
    return copy.deepcopy(value)


def _merge(current, changes):
    merged = copy.deepcopy(current)
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        elif isinstance(value, dict):
            stripped = strip_nulls(value)
            # {"log-opts": {"max-size": null}} on a file without log-opts has nothing to remove: add no empty object.
            if stripped or not value or key in merged:
                merged[key] = stripped
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def merge_config(current, changes):
    """Merge ``changes`` into ``current`` and return ``(merged, changed_keys)``.

    - Nested dicts are merged key by key; any other value replaces the existing one.
    - A value of None removes the key.
    - Existing keys keep their position, new keys are appended.
    - ``changed_keys`` is the sorted list of top-level keys whose value was changed, added or removed.

    Neither argument is modified.
    """
    if not isinstance(current, dict):
        raise TypeError("current must be a dict")
    if not isinstance(changes, dict):
        raise TypeError("changes must be a dict")
    merged = _merge(current, changes)
    keys = set(current) | set(merged)
    changed_keys = sorted(
        k for k in keys if k not in current or k not in merged or not json_equal(current[k], merged[k])
    )
    return merged, changed_keys


def parse_config(text, path):
    """Parse the text of a daemon.json; empty or whitespace-only text is ``{}``.

    Raises DaemonConfigError with a message for the user when the text is not a JSON object.
    """
    if not text.strip():
        return {}
    advice = f"The file was left untouched: fix {path} or remove it, then run again."
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DaemonConfigError(
            f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno} (char {e.pos}). {advice}"
        ) from e
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(data), "a number")
        raise DaemonConfigError(f"{path} holds {kind}, but Docker's daemon.json must be a JSON object. {advice}")
    return data


def render_config(data):
    """The text written to the file: JSON indented by two spaces, non-ASCII kept as is, with a trailing newline."""
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def read_config(path):
    """Return ``(text, data)`` of the file at ``path``; a missing file is ``("", {})``."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return "", {}
    except IsADirectoryError as e:
        raise DaemonConfigError(f"{path} is a directory, not a file. Nothing was changed.") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DaemonConfigError(
            f"{path} is not valid JSON: it is not UTF-8 text ({e}). "
            f"The file was left untouched: fix {path} or remove it, then run again."
        ) from e
    return text, parse_config(text, path)


def dockerd_supports_validate(module, dockerd):
    """True when ``dockerd --help`` lists ``--validate`` (Docker 23 and later)."""
    rc, out, err = module.run_command([dockerd, "--help"])
    return rc == 0 and "--validate" in (out + err)


def validate_content(module, dockerd, content):
    """Run ``dockerd --validate`` on ``content``; return None when it is valid, else dockerd's message."""
    fd, tmp = tempfile.mkstemp(prefix="daemon.", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(content)
        rc, out, err = module.run_command([dockerd, "--validate", "--config-file", tmp])
    finally:
        os.unlink(tmp)
    if rc == 0:
        return None
    message = (err.strip() or out.strip() or f"dockerd exited with status {rc}").replace(tmp, "<new daemon.json>")
    return message


def make_dirs(path):
    """Create ``path`` and missing parents with mode 0755 (regardless of the umask)."""
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for d in reversed(missing):
        os.mkdir(d)
        os.chmod(d, DIR_MODE)


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_args(module, path):
    mode = module.params["mode"]
    root = os.geteuid() == 0
    return {
        "path": path,
        "mode": DEFAULT_MODE if mode is None else mode,
        "owner": "root" if root else None,
        "group": "root" if root else None,
        # SELinux: keep the context the file has (the temporary file gets the directory's default context).
        "secontext": [None] * 4,
        "attributes": None,
    }


def atomic_write(module, path, content):
    """Write ``content`` to ``path`` through a temporary file in the same directory and a rename."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        # Mode and owner on the temporary file, so the file never exists at path with other permissions.
        module.set_fs_attributes_if_different(file_args(module, tmp), False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def run_module(module):
    path = module.params["path"]
    changes = module.params["config"]

    before_text, current = read_config(path)
    merged, changed_keys = merge_config(current, changes)
    content_changed = not json_equal(current, merged)
    after_text = render_config(merged) if content_changed else before_text

    result = {
        "changed": content_changed,
        "path": path,
        "config": merged,
        "changed_keys": changed_keys,
        "validated": False,
    }
    if module._diff:
        result["diff"] = {
            "before": before_text,
            "after": after_text,
            "before_header": path,
            "after_header": path,
        }

    if content_changed:
        if module.params["validate"]:
            dockerd = module.get_bin_path("dockerd")
            if dockerd and dockerd_supports_validate(module, dockerd):
                error = validate_content(module, dockerd, after_text)
                if error is not None:
                    module.fail_json(
                        msg=f"dockerd rejected the new content of {path}; the file was left untouched: {error}",
                        path=path,
                        changed_keys=changed_keys,
                    )
                result["validated"] = True

        if not module.check_mode:
            make_dirs(os.path.dirname(path))
            if module.params["backup"] and os.path.exists(path):
                result["backup_file"] = module.backup_local(path)
            atomic_write(module, path, after_text)

    if os.path.exists(path):
        # Mode or owner of a file whose content is already right (in check mode: only reports).
        result["changed"] = module.set_fs_attributes_if_different(file_args(module, path), result["changed"])
    return result


def main():
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "default": DEFAULT_PATH},
            "config": {"type": "dict", "required": True},
            "backup": {"type": "bool", "default": True},
            "validate": {"type": "bool", "default": True},
            "mode": {"type": "raw", "default": DEFAULT_MODE},
        },
        supports_check_mode=True,
    )
    try:
        result = run_module(module)
    except DaemonConfigError as e:
        module.fail_json(msg=str(e), path=module.params["path"])
    except Exception as e:
        module.fail_json(
            msg=f"Unexpected error while updating {module.params['path']}: {e}",
            exception=traceback.format_exc(),
        )
    module.exit_json(**result)


if __name__ == "__main__":
    main()
