# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT
"""Filters of the notebook role about what the server already holds: the listening ports (from ss), the workdirs and
their file systems to look at, the NVIDIA GPUs (gpu_facts), and the containers (Docker's /containers/json): which
gpulab manages (its labels), which it does not, and which a backup restored.

notebook_plan.py calls these checks with the facts the role gathered; nothing here reads a secret.
tests/unit/test_notebook_filters.py feeds them through notebook_plan.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re

from ansible_collections.gpulab.lab.plugins.module_utils.notebook.desired import LABEL_RESTORED, LABEL_USER

GPU_UUID_RE = re.compile(r"^(GPU|MIG)-[0-9A-Za-z-]+$")
# How gpulab knows its notebook containers and whose each is, the limits as a label (a new limit changes the
# settings gpulab sets, so the container is recreated with it: docker update cannot remove a limit), the lab image
# it was configured with, and the label container_restore puts on a container it rebuilt from a backup: one set of
# names, module notebook_containers' (module_utils/notebook/desired.py).
LIMITS = ("memory", "cpus", "shm_size")

# ---- small helpers ----------------------------------------------------------------------------------------------


def is_loopback(address):
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def publish_address(address):
    """Docker's published_ports syntax wants IPv6 addresses in brackets."""
    return f"[{address}]" if ":" in address else address


def is_wildcard(address):
    """Whether a listening address means every address of the host (0.0.0.0, ::, * or empty)."""
    if address in ("", "*"):
        return True
    try:
        return ipaddress.ip_address(address).is_unspecified
    except ValueError:
        return False


def _overlap(first, second):
    """Whether two listening addresses of the same port collide (a wildcard collides with everything)."""
    return first == second or is_wildcard(first) or is_wildcard(second)


def valid_port(value):
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def as_int(value):
    """An int from an int or a string of digits (inventory values arrive as either); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def note_restored(planned, settings):
    """A notebook restored from a backup (playbooks/restore.yml) runs the backup's image, which holds what the student
    installed in the container: the plan notes it (restored_from) and keeps the restore label. Module
    notebook_containers keeps the container's image whatever it is (it carries the environment over when it must
    recreate the container), and applies a new lab image by the student's image policy."""
    by_name = {container_name(c): c for c in settings.get("containers") or []}
    for _position, _where, user in planned:
        labels = (by_name.get(user["container"]) or {}).get("Labels") or {}
        if user["state"] != "absent" and labels.get(LABEL_USER) == user["name"] and labels.get(LABEL_RESTORED):
            user["restored_from"] = labels[LABEL_RESTORED]
            user["labels"][LABEL_RESTORED] = labels[LABEL_RESTORED]


def container_name(container):
    names = container.get("Names") or []
    return names[0].lstrip("/") if names else str(container.get("Id", ""))[:12]


def _published(container):
    """(address, port) of each TCP port a running container publishes."""
    return [
        (str(port.get("IP") or ""), int(port["PublicPort"]))
        for port in container.get("Ports") or []
        if port.get("PublicPort") and (port.get("Type") or "tcp") == "tcp"
    ]


def check_containers(planned, settings):
    """Errors against what runs on the server: containers gpulab does not manage, and other listening programs."""
    wanted = {user["name"]: (where, user) for _position, where, user in planned}
    active = [
        (where, user) for where, user in wanted.values() if user["state"] != "absent" and valid_port(user["port"])
    ]
    containers = settings.get("containers") or []
    errors = []
    for container in containers:
        name = container_name(container)
        owner = (container.get("Labels") or {}).get(LABEL_USER)
        for user_name, (where, user) in wanted.items():
            if name == user["container"] and owner != user_name:
                errors.append(
                    f"{where}: a container named {name} exists on the server and gpulab does not manage it (no label "
                    f"{LABEL_USER}={user_name}); rename or remove it, or change notebook_container_prefix"
                )
        # A port of another listed user's container is free once that user's entry is applied (the same port in two
        # entries is reported by _check_together); one of a container outside notebook_users is not.
        if owner in wanted:
            continue
        for where, user in active:
            for address, port in _published(container):
                if port == user["port"] and _overlap(address, user["bind_address"]):
                    errors.append(f"{where}: port {port} is already published by {_owner_text(name, owner)}")
    published = {port for container in containers for _address, port in _published(container)}
    listeners = [str(listener) for listener in settings.get("listeners") or []]
    for where, user in active:
        if user["port"] in published:
            continue  # docker-proxy's own socket of a published port: the containers are checked above
        for listener in listeners:
            address, _colon, port_text = listener.rpartition(":")
            if as_int(port_text) == user["port"] and _overlap(address.strip("[]"), user["bind_address"]):
                errors.append(
                    f"{where}: port {user['port']} is in use on the server by a program outside Docker (listening "
                    f"on {listener}); choose another port"
                )
                break
    return errors


def _owner_text(name, owner):
    if owner is None:
        return f"the container {name}, which gpulab does not manage; choose another port, or stop that container"
    return (
        f"{name}, gpulab's notebook of {owner}, who is no longer in notebook_users; add "
        f"{{name: {owner}, state: absent}} to remove it, or choose another port"
    )


def notebook_listeners(ss_output):
    """Listening TCP addresses ('address:port') from `ss -Htln` output."""
    listeners = []
    for line in str(ss_output or "").splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0] == "LISTEN":
            listeners.append(re.sub(r"%[^\]:]*", "", fields[3]))  # drop an interface scope: 127.0.0.53%lo:53
    return listeners


def notebook_workdirs(users):
    """The absolute workdirs of notebook_users and their parent folders, normalised (the role looks at each before
    the plan)."""
    found = []
    for entry in users or []:
        workdir = entry.get("workdir") if isinstance(entry, dict) else None
        if isinstance(workdir, str) and posixpath.isabs(workdir):
            path = posixpath.normpath(workdir)
            for item in (path, posixpath.dirname(path)):
                if item not in found:
                    found.append(item)
    return found


def notebook_paths(stat_output, asked=()):
    """{path: {"exists": bool, "isdir": bool}} of the paths asked, from `stat --printf '%F\\t%n\\n' PATH...` (a
    missing path is not listed: it does not exist). One command for every workdir and its parent, instead of one task
    per path."""
    paths = {path: {"exists": False, "isdir": False} for path in asked or ()}
    for line in str(stat_output or "").splitlines():
        kind, _tab, path = line.partition("\t")
        if path:
            paths[path] = {"exists": True, "isdir": kind == "directory"}
    return paths


def notebook_mounts(findmnt_output):
    """{mount point: file system type} from `findmnt --raw --noheadings --output TARGET,FSTYPE` (raw output writes a
    space in a path as \\x20)."""
    mounts = {}
    for line in str(findmnt_output or "").splitlines():
        fields = line.split()
        if len(fields) == 2:
            target = re.sub(r"\\x([0-9a-fA-F]{2})", lambda match: chr(int(match.group(1), 16)), fields[0])
            mounts[target] = fields[1]
    return mounts


def filesystem_of(path, mounts):
    """(mount point, file system type) that holds a normalised absolute path, missing or not: the deepest mount point
    above it. (None, None) when the mounts are unknown."""
    best = None
    for target in mounts or {}:
        inside = path == target or path.startswith(target.rstrip("/") + "/")
        if inside and (best is None or len(target) > len(best)):
            best = target
    return (best, mounts[best]) if best is not None else (None, None)


def gpu_requests(spec, gpu_facts):
    """(display text, device_requests, errors) for an entry's gpus against gpu_facts' gpulab_gpu."""
    present = bool(gpu_facts and gpu_facts.get("present"))
    gpus = (gpu_facts or {}).get("gpus") or []
    if spec in (None, "", "none", []):
        return "none", [], []
    if spec == "all":
        if not present:
            return "all", [], ["gpus is all, but the server has no NVIDIA GPU (gpu_facts); use gpus: none"]
        return "all", [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}], []
    if not isinstance(spec, list):
        return str(spec), [], [f"gpus must be all, none or a list of GPU indices or UUIDs, not {spec!r}"]
    by_index = {int(gpu["index"]): gpu for gpu in gpus if gpu.get("index") is not None}
    by_uuid = {gpu["uuid"]: gpu for gpu in gpus if gpu.get("uuid")}
    have = ", ".join(f"{index} ({by_index[index].get('uuid')})" for index in sorted(by_index)) or "none"
    ids, errors = [], []
    for item in spec:
        index = as_int(item)
        if index is not None:
            if index not in by_index:
                errors.append(f"GPU {index} is not on the server (its NVIDIA GPUs: {have})")
            ids.append(str(index))
        elif isinstance(item, str) and GPU_UUID_RE.match(item):
            if item not in by_uuid:
                errors.append(f"GPU {item} is not on the server (its NVIDIA GPUs: {have})")
            ids.append(item)
        else:
            errors.append(f"{item!r} in gpus is neither a GPU index nor a GPU UUID (GPU-...)")
    if len(set(ids)) != len(ids):
        errors.append(f"gpus names a GPU twice ({', '.join(ids)})")
    if not ids:
        return "none", [], errors
    return ", ".join(ids), [{"driver": "nvidia", "count": 0, "device_ids": ids, "capabilities": [["gpu"]]}], errors


class FilterModule:
    def filters(self):
        return {
            "notebook_listeners": notebook_listeners,
            "notebook_mounts": notebook_mounts,
            "notebook_paths": notebook_paths,
            "notebook_workdirs": notebook_workdirs,
        }
