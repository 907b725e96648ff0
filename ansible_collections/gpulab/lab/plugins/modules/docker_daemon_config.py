#!/usr/bin/python
# Copyright (c) gpulab developers
# MIT License (see pyproject.toml)
# Ansible module layout: imports follow DOCUMENTATION/EXAMPLES/RETURN (validate-modules wants it so).
"""Merge keys into Docker's daemon.json instead of overwriting the whole file.

/etc/docker/daemon.json is shared: admins edit it by hand, the NVIDIA Container Toolkit adds its runtime, other tools
add registry mirrors or log settings. NVIDIA's Ansible role and geerlingguy's docker role template the file as a whole,
so every run silently drops settings that someone else made. No module of ansible-core, community.docker or
community.general merges a JSON file key by key with validation, hence this module: it changes only the keys it is
given, keeps every other key (and the key order) as it was, refuses keys that would keep dockerd from starting (its own
schema of Docker's keys on every engine version, ``dockerd --validate`` in addition where the engine has it), and
writes the file atomically. It neither restarts Docker nor talks to it: role docker does (and rolls back).
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
    the change to take effect. Keys that would keep it from starting are refused before writing (O(validate)).
author: gpulab developers (!UNKNOWN)
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
      - Check every key this run writes before anything is written, on every engine version gpulab supports (Docker
        20.10 and later). dockerd refuses to start on a key it does not know or a value of the wrong JSON type, and
        only Docker 23 and later can check a file without starting, so the module carries a schema of the keys Docker
        documents - each key's JSON type, the values Docker allows (for example C(log-level), C(default-cgroupns-mode)),
        and the engine versions that know it (the installed C(dockerd --version); without a dockerd, any version).
      - An unknown key is refused with the nearest known key named (C(live-restor) - did you mean C(live-restore)?).
        Keys the run leaves as they are are not checked - the running engine took them.
      - Where the installed C(dockerd) has C(--validate) (Docker 23 and later), the new content is also checked with
        C(dockerd --validate --config-file <tempfile>).
      - When a check fails, the module fails with every problem, or with dockerd's message, and the file is left
        untouched (in check mode too, so a preview finds the problem).
      - Some values pass both checks and still keep dockerd from starting (a path it cannot create, a C(hosts) entry
        that its unit's C(-H) flag contradicts); role docker's restart handler puts the previous file back then.
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
    - Whether the new content was also checked with C(dockerd --validate).
    - V(false) when nothing had to be written, when O(validate=false), or when no C(dockerd) supporting C(--validate)
      was found (for example Debian 12's C(docker.io) 20.10); gpulab's own schema checked the keys then.
  returned: always
  type: bool
  sample: false
engine_version:
  description: The installed dockerd's version (major.minor) the keys were checked against; V(null) when none was found.
  returned: always
  type: str
  sample: "20.10"
previous_content:
  description:
    - The file's text before this run, V(null) when it did not exist. Role docker puts it back when Docker does not
      start with the new file.
  returned: always
  type: str
problems:
  description: Every problem the schema found in the new keys, when it refused them.
  returned: failure
  type: list
  elements: str
  sample: ["'live-restore' must be true or false, not the string \"yes-please\""]
diff:
  description: The file content before and after, when run with C(--diff).
  returned: when diff mode is on
  type: dict
"""

import copy
import difflib
import json
import os
import re
import tempfile
import traceback
from typing import NamedTuple

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.gpulab.lab.plugins.module_utils.files import fsync_dir

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


# --- the keys Docker documents for daemon.json, per engine version --------------------------------------------------
# gpulab supports Docker 20.10 (Debian 11 and 12, Ubuntu 20.04 and 22.04's docker.io) up to the current docker-ce.
# dockerd refuses to start on a key it does not know, and on a value of the wrong JSON type (Go's json decoder), and
# only Docker 23 and later can check a file without starting (`dockerd --validate`). So the module checks, itself,
# every key it writes: known to the engine's version, of the type Docker decodes it into, one of the values Docker's
# own config validation allows. A key that this module does not write is left alone: the running engine took it.

KIND_NAMES = {
    "bool": "true or false",
    "str": "a string",
    "int": "a whole number",
    "list[str]": "a list of strings",
    "dict[str]": 'an object of strings (every value quoted, e.g. "3" not 3)',
    "dict[bool]": "an object of true/false values",
    "dict": "an object",
    "runtimes": 'an object of runtimes, each {"path": "...", "runtimeArgs": [...]}',
    "ulimits": 'an object of ulimits, each {"Name": "nofile", "Soft": 1024, "Hard": 2048}',
    "address-pools": 'a list of {"base": "CIDR", "size": NUMBER}',
    "network-opts": "an object of network drivers, each an object of strings",
}


class Key(NamedTuple):
    """One daemon.json key: the JSON shape Docker decodes it into, the values it allows, the engine versions that know
    it (``since`` included, ``until`` excluded, as (major, minor))."""

    kind: str
    choices: tuple = ()
    minimum: int | None = None
    since: tuple[int, int] = (0, 0)
    until: tuple[int, int] | None = None
    pattern: str | None = None  # each string (of a str or list[str] key) must match


DAEMON_KEYS = {
    "allow-direct-routing": Key("bool", since=(28, 0)),
    "allow-nondistributable-artifacts": Key("list[str]"),
    "api-cors-header": Key("str"),
    "authorization-plugins": Key("list[str]"),
    "bip": Key("str"),
    "bip6": Key("str", since=(28, 0)),
    "bridge": Key("str"),
    "builder": Key("dict"),
    "cdi-spec-dirs": Key("list[str]", since=(25, 0)),
    "cgroup-parent": Key("str"),
    "cluster-advertise": Key("str", until=(23, 0)),
    "cluster-store": Key("str", until=(23, 0)),
    "cluster-store-opts": Key("dict[str]", until=(23, 0)),
    "containerd": Key("str"),
    "containerd-namespace": Key("str"),
    "containerd-plugins-namespace": Key("str"),
    "cpu-rt-period": Key("int"),
    "cpu-rt-runtime": Key("int"),
    "cri-containerd": Key("bool"),
    "data-root": Key("str", pattern=r"^/"),
    "debug": Key("bool"),
    "default-address-pools": Key("address-pools"),
    "default-cgroupns-mode": Key("str", choices=("private", "host")),
    "default-gateway": Key("str"),
    "default-gateway-v6": Key("str"),
    "default-ipc-mode": Key("str", choices=("private", "shareable")),
    "default-network-opts": Key("network-opts", since=(24, 0)),
    "default-runtime": Key("str"),
    "default-shm-size": Key("str"),
    "default-ulimits": Key("ulimits"),
    "dns": Key("list[str]"),
    "dns-opts": Key("list[str]"),
    "dns-search": Key("list[str]"),
    "exec-opts": Key("list[str]"),
    "exec-root": Key("str", pattern=r"^/"),
    "experimental": Key("bool"),
    "features": Key("dict[bool]"),
    "firewall-backend": Key("str", choices=("iptables", "nftables"), since=(28, 2)),
    "fixed-cidr": Key("str"),
    "fixed-cidr-v6": Key("str"),
    "graph": Key("str", until=(23, 0)),
    "group": Key("str"),
    "host-gateway-ip": Key("str"),
    "hosts": Key("list[str]"),
    "icc": Key("bool"),
    "init": Key("bool"),
    "init-path": Key("str"),
    "insecure-registries": Key("list[str]"),
    "ip": Key("str"),
    "ip-forward": Key("bool"),
    "ip-forward-no-drop": Key("bool", since=(28, 0)),
    "ip-masq": Key("bool"),
    "ip6tables": Key("bool"),
    "iptables": Key("bool"),
    "ipv6": Key("bool"),
    "labels": Key("list[str]"),
    "live-restore": Key("bool"),
    "log-driver": Key("str"),
    "log-format": Key("str", choices=("text", "json"), since=(25, 0)),
    "log-level": Key("str", choices=("debug", "info", "warn", "error", "fatal")),
    "log-opts": Key("dict[str]"),
    "max-concurrent-downloads": Key("int", minimum=0),
    "max-concurrent-uploads": Key("int", minimum=0),
    "max-download-attempts": Key("int", minimum=1),
    "metrics-addr": Key("str"),
    "mtu": Key("int", minimum=0),
    "network-control-plane-mp-timeout": Key("int"),
    "no-new-privileges": Key("bool"),
    "node-generic-resources": Key("list[str]"),
    "oom-score-adjust": Key("int", until=(25, 0)),
    "pidfile": Key("str", pattern=r"^/"),
    "proxies": Key("dict[str]", since=(23, 0)),
    "raw-logs": Key("bool"),
    "registry-mirrors": Key("list[str]", pattern=r"^https?://"),
    "rootless": Key("bool"),
    "runtimes": Key("runtimes"),
    "seccomp-profile": Key("str"),
    "selinux-enabled": Key("bool"),
    "shutdown-timeout": Key("int"),
    "storage-driver": Key("str"),
    "storage-opts": Key("list[str]"),
    "swarm-default-advertise-addr": Key("str"),
    "tls": Key("bool"),
    "tlscacert": Key("str"),
    "tlscert": Key("str"),
    "tlskey": Key("str"),
    "tlsverify": Key("bool"),
    "userland-proxy": Key("bool"),
    "userland-proxy-path": Key("str"),
    "userns-remap": Key("str"),
}


def describe(value):
    """A JSON value as a user reads it in an error message: its JSON type and (shortened) text."""
    kind = {bool: "the boolean", str: "the string", int: "the number", float: "the number", list: "the list",
            dict: "the object", type(None): ""}.get(type(value), "the value")  # fmt: skip
    text = json.dumps(value, ensure_ascii=False)
    return f"{kind} {text if len(text) <= 60 else text[:57] + '...'}".strip()


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _shape_problem(kind, value):
    """Why ``value`` does not have the JSON shape ``kind``, or None when it has."""
    all_str = isinstance(value, list) and all(isinstance(v, str) for v in value)
    ok = {
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "int": _is_int(value),
        "list[str]": all_str,
        "dict[str]": isinstance(value, dict) and all(isinstance(v, str) for v in value.values()),
        "dict[bool]": isinstance(value, dict) and all(isinstance(v, bool) for v in value.values()),
        "dict": isinstance(value, dict),
        "runtimes": isinstance(value, dict)
        and all(
            isinstance(r, dict)
            and isinstance(r.get("path", ""), str)
            and isinstance(r.get("runtimeArgs", []), list)
            and all(isinstance(a, str) for a in r.get("runtimeArgs", []))
            for r in value.values()
        ),
        "ulimits": isinstance(value, dict)
        and all(
            isinstance(u, dict)
            and isinstance(u.get("Name", ""), str)
            and all(_is_int(u.get(limit, 0)) for limit in ("Soft", "Hard"))
            for u in value.values()
        ),
        "address-pools": isinstance(value, list)
        and all(isinstance(p, dict) and isinstance(p.get("base"), str) and _is_int(p.get("size")) for p in value),
        "network-opts": isinstance(value, dict)
        and all(isinstance(o, dict) and all(isinstance(v, str) for v in o.values()) for o in value.values()),
    }[kind]
    return None if ok else f"must be {KIND_NAMES[kind]}, not {describe(value)}"


def version_text(version):
    return ".".join(str(n) for n in version)


def _version_problem(name, key, engine):
    if engine is not None and engine < key.since:
        return f"{name!r} needs Docker {version_text(key.since)} or later; this server runs {version_text(engine)}"
    if engine is not None and key.until is not None and engine >= key.until:
        return f"{name!r} was removed in Docker {version_text(key.until)}; this server runs {version_text(engine)}"
    return None


def _value_problem(name, key, value):
    """Why ``value`` (of the right shape) is not one Docker allows for ``key``, or None."""
    if key.choices and value not in key.choices:
        return f"{name!r} must be one of {', '.join(key.choices)}, not {describe(value)}"
    if key.minimum is not None and value < key.minimum:
        return f"{name!r} must be {key.minimum} or more, not {value}"
    bad = [v for v in (value if isinstance(value, list) else [value]) if key.pattern and not re.match(key.pattern, v)]
    if bad:
        need = {"^/": "an absolute path", "^https?://": "a URL starting with http:// or https://"}[key.pattern]
        return f"{name!r} must be {need}, not {describe(bad[0])}"
    return None


def key_problem(name, value, engine):
    """Why daemon.json key ``name`` with ``value`` would keep dockerd ``engine`` ((major, minor), or None when unknown)
    from starting, or None when Docker accepts it."""
    key = DAEMON_KEYS.get(name)
    if key is None:
        near = difflib.get_close_matches(name, DAEMON_KEYS, n=1, cutoff=0.6)
        hint = f"did you mean {near[0]!r}?" if near else "see Docker's daemon.json reference for the keys it knows"
        return f"{name!r} is not a key Docker knows ({hint})"
    shape = _shape_problem(key.kind, value)
    return (
        _version_problem(name, key, engine)
        or (f"{name!r} {shape}" if shape else None)
        or _value_problem(name, key, value)
    )


def schema_problems(config, keys, engine):
    """The problems of the top-level ``keys`` of ``config`` (the keys this run writes; a removed key has none)."""
    problems = []
    for name in keys:
        if name in config:
            problem = key_problem(name, config[name], engine)
            if problem:
                problems.append(problem)
    return problems


def engine_version(module, dockerd):
    """The installed dockerd's (major, minor), e.g. (20, 10) for docker.io's "Docker version 20.10.24+dfsg1"; None
    when there is no dockerd or it does not say."""
    if not dockerd:
        return None
    rc, out, err = module.run_command([dockerd, "--version"])
    match = re.search(r"version v?(\d+)\.(\d+)", out + err) if rc == 0 else None
    return (int(match[1]), int(match[2])) if match else None


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


def validate_new_keys(module, merged, written_keys, after_text):
    """Refuse, before anything is written, keys that would keep dockerd from starting: gpulab's schema on every engine
    version, then ``dockerd --validate`` where the engine has it (Docker 23 and later). Returns ``(engine_version,
    validated)``: the version the keys were checked against (None: any), and whether dockerd checked them too."""
    path = module.params["path"]
    dockerd = module.get_bin_path("dockerd")
    engine = engine_version(module, dockerd)
    engine_text = version_text(engine) if engine else None
    problems = schema_problems(merged, written_keys, engine)
    if problems:
        module.fail_json(
            msg=f"Docker would not start with the new {path}, so it was left untouched: {'; '.join(problems)}.",
            path=path,
            problems=problems,
            engine_version=engine_text,
        )
    if not (dockerd and dockerd_supports_validate(module, dockerd)):
        return engine_text, False
    error = validate_content(module, dockerd, after_text)
    if error is not None:
        module.fail_json(
            msg=f"dockerd rejected the new content of {path}; the file was left untouched: {error}",
            path=path,
            changed_keys=sorted(written_keys),
        )
    return engine_text, True


def run_module(module):
    path = module.params["path"]
    changes = module.params["config"]

    existed = os.path.exists(path)
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
        "engine_version": None,
        "previous_content": before_text if existed else None,
    }
    if module._diff:
        result["diff"] = {
            "before": before_text,
            "after": after_text,
            "before_header": path,
            "after_header": path,
        }

    if content_changed and module.params["validate"]:
        written = [k for k in changed_keys if k in merged]
        result["engine_version"], result["validated"] = validate_new_keys(module, merged, written, after_text)

    if content_changed and not module.check_mode:
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
