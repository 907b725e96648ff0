# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""What gpulab wants of one student's notebook container, from the role's plan (plugins/filter/notebook_plan.py,
which holds no secret): the engine's create body, the hash of every setting gpulab sets (kept as a label, so that a
run compares one string per container instead of a dozen fields of `docker inspect`), and a readable summary of the
settings, also kept as a label, for the play's messages and --diff.

The lab image is not part of the hash: a new image is applied by the student's image policy (apply.py), not by a
recreate. Nothing here talks to the engine.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import NOTEBOOK_USER_LABEL, RESTORED_LABEL

# How gpulab knows its notebook containers and whose each is (the role's filters use the same names).
LABEL_ROLE = "io.gpulab.notebook"
LABEL_USER = NOTEBOOK_USER_LABEL
LABEL_LIMITS = "io.gpulab.notebook.limits"
# The lab image the notebook was configured with (its name), and the ID of the lab image the student's environment
# was made from: the container itself may run on a carry-over image of gpulab-carry/ (that image plus the student's
# changes).
LABEL_IMAGE = "io.gpulab.notebook.image"
LABEL_BASE = "io.gpulab.notebook.base-image-id"
# sha256 of the settings gpulab sets; and the same settings, readable (what changed, for the play and --diff).
LABEL_SETTINGS = "io.gpulab.notebook.settings"
LABEL_SUMMARY = "io.gpulab.notebook.summary"
# The label container_restore puts on a container it rebuilt from a backup.
LABEL_RESTORED = RESTORED_LABEL
# Labels that say where the environment comes from, not how it runs: left out of the hash.
NOT_HASHED = (LABEL_IMAGE, LABEL_BASE, LABEL_SETTINGS, LABEL_SUMMARY, LABEL_RESTORED)
CONTAINER_PORT = "8888/tcp"
SIZE_RE = re.compile(r"^([0-9]+)([bkmg]?)$", re.IGNORECASE)
UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
# The summary's keys, in the order the play names them.
SUMMARY_KEYS = ("port", "gpus", "memory", "cpus", "shm_size", "ipc_mode", "env", "mounts", "user", "command")


def size_bytes(text):
    """'2g' -> 2147483648, as Docker reads --memory and --shm-size; None and '' -> 0."""
    if text in (None, ""):
        return 0
    match = SIZE_RE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size such as 512m or 16g")
    return int(match.group(1)) * UNITS[match.group(2).lower()]


def _device_requests(requests):
    return [
        {
            "Driver": r.get("driver", "nvidia"),
            "Count": int(r.get("count", 0)),
            "DeviceIDs": r.get("device_ids"),
            "Capabilities": r.get("capabilities") or [["gpu"]],
        }
        for r in requests or []
    ]


def _port_bindings(user):
    address = str(user.get("bind_address") or "127.0.0.1")
    return {CONTAINER_PORT: [{"HostIp": address, "HostPort": str(user["port"])}]}


@dataclass(frozen=True)
class Desired:
    """One student's container as gpulab wants it: settings (hashed), their summary, and the labels that are not."""

    name: str
    container: str
    state: str
    image: str  # the lab image, by name
    policy: str  # keep, rebase or replace
    settings: dict
    summary: dict
    digest: str

    @classmethod
    def of(cls, user, restart_policy, default_policy="keep"):
        """From a plan user (with its command: notebook_commands)."""
        labels = {k: str(v) for k, v in (user.get("labels") or {}).items() if k not in NOT_HASHED}
        env = {str(k): str(v) for k, v in (user.get("env") or {}).items()}
        host_config = {
            "PortBindings": _port_bindings(user),
            "Mounts": [
                {"Type": "bind", "Source": m["source"], "Target": m["target"], "ReadOnly": bool(m.get("read_only"))}
                for m in user.get("mounts") or []
            ],
            "DeviceRequests": _device_requests(user.get("device_requests")),
            "IpcMode": user.get("ipc_mode") or "host",
            "Memory": size_bytes(user.get("memory")),
            "NanoCpus": round(float(user["cpus"]) * 1e9) if user.get("cpus") not in (None, "") else 0,
            "Init": True,
            "RestartPolicy": {"Name": restart_policy},
        }
        if user.get("shm_size"):
            host_config["ShmSize"] = size_bytes(user["shm_size"])
        settings = {
            "Cmd": list(user.get("command") or []),
            "User": str(user.get("user") or ""),
            "Env": env,
            "Labels": labels,
            "HostConfig": host_config,
        }
        digest = "sha256:" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        summary = {
            "port": f"{user.get('bind_address') or '127.0.0.1'}:{user['port']}",
            "gpus": str(user.get("gpus") or "none"),
            "memory": user.get("memory") or "none",
            "cpus": str(user["cpus"]) if user.get("cpus") not in (None, "") else "none",
            "shm_size": user.get("shm_size") or "none",
            "ipc_mode": host_config["IpcMode"],
            "env": env,
            "mounts": [f"{m['Source']}:{m['Target']}{':ro' if m['ReadOnly'] else ''}" for m in host_config["Mounts"]],
            "user": settings["User"],
            "command": " ".join(settings["Cmd"]),
        }
        return cls(
            name=user["name"],
            container=user["container"],
            state=user["state"],
            image=user.get("image") or "",
            policy=user.get("image_policy") or default_policy,
            settings=settings,
            summary=summary,
            digest=digest,
        )

    def labels(self, image_name, base_id, extra=None):
        """The container's labels: the hashed ones, then where its environment comes from."""
        labels = dict(self.settings["Labels"])
        labels.update(extra or {})
        labels.update(
            {
                LABEL_IMAGE: image_name,
                LABEL_BASE: base_id,
                LABEL_SETTINGS: self.digest,
                LABEL_SUMMARY: json.dumps(self.summary, sort_keys=True, separators=(",", ":")),
            }
        )
        return labels

    def body(self, image, labels, env_of_image=(), env_of_base=()):
        """The engine's create body on `image`. env_of_image: the Env of that image (a carry-over image holds the
        old container's environment); a variable there that gpulab no longer sets goes back to the lab image's value
        (env_of_base), or is removed (a bare NAME removes it, as the engine reads a create body)."""
        env = dict(self.settings["Env"])
        base = dict(_env_pairs(env_of_base))
        extra = []
        for key, value in _env_pairs(env_of_image):
            if key in env or base.get(key) == value:
                continue
            extra.append(f"{key}={base[key]}" if key in base else key)
        return {
            "Image": image,
            "Cmd": self.settings["Cmd"],
            "User": self.settings["User"],
            "Env": [f"{k}={v}" for k, v in env.items()] + extra,
            "Labels": labels,
            "ExposedPorts": {CONTAINER_PORT: {}},
            "HostConfig": json.loads(json.dumps(self.settings["HostConfig"])),
        }


def _env_pairs(env):
    for item in env or ():
        key, _eq, value = str(item).partition("=")
        yield key, value


def summary_of(labels):
    """The summary a container was made with (its label), or None (a container of an older gpulab)."""
    try:
        summary = json.loads((labels or {}).get(LABEL_SUMMARY) or "")
    except ValueError:
        return None
    return summary if isinstance(summary, dict) else None


def changed_keys(before, after):
    """The summary keys whose values differ, in the summary's order; None when before is unknown."""
    if before is None:
        return None
    return [key for key in SUMMARY_KEYS if before.get(key) != after.get(key)]


def summary_text(summary):
    """One line of a summary, for --diff."""
    parts = []
    for key in SUMMARY_KEYS:
        value = summary.get(key)
        if key == "env":
            value = ", ".join(f"{k}={v}" for k, v in sorted((value or {}).items())) or "none"
        elif key == "mounts":
            value = ", ".join(value or []) or "none"
        parts.append(f"{key}: {value}")
    return "; ".join(parts)
