# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""A container's run settings, as a backup keeps them and a restore creates the container again with, and the
secret environment variables left out of them and of the stored image config.

Pure functions of the engine's inspect data: nothing here talks to the engine or touches the store.
"""

from __future__ import annotations

import fnmatch
import json

DEFAULT_SECRET_ENV = [
    "*TOKEN*",
    "*PASSWORD*",
    "*PASSWD*",
    "*SECRET*",
    "*API_KEY*",
    "*APIKEY*",
    "*PRIVATE_KEY*",
    "*CREDENTIAL*",
]
# Container config keys a re-created container gets back (HostConfig is kept whole, less the keys below).
CONFIG_KEYS = (
    "Hostname",
    "Domainname",
    "User",
    "AttachStdin",
    "AttachStdout",
    "AttachStderr",
    "ExposedPorts",
    "Tty",
    "OpenStdin",
    "StdinOnce",
    "Env",
    "Cmd",
    "Healthcheck",
    "ArgsEscaped",
    "Volumes",
    "WorkingDir",
    "Entrypoint",
    "NetworkDisabled",
    "OnBuild",
    "Labels",
    "StopSignal",
    "StopTimeout",
    "Shell",
)
DROPPED_HOST_CONFIG = ("ContainerIDFile", "MaskedPaths", "ReadonlyPaths", "ConsoleSize")
BUILTIN_NETWORKS = ("bridge", "host", "none", "default")


def env_name(entry):
    return entry.split("=", 1)[0]


def is_secret(name, patterns):
    return any(fnmatch.fnmatchcase(name.upper(), str(p).upper()) for p in patterns)


def split_env(env, image_env, patterns):
    """(env without secret values, names left out). A variable is left out when its name matches a secret pattern
    and the container set it (an entry identical to one of the image's own is public)."""
    public = set(image_env or [])
    kept, left_out = [], []
    for entry in env or []:
        if entry not in public and is_secret(env_name(entry), patterns):
            left_out.append(env_name(entry))
        else:
            kept.append(entry)
    return kept, left_out


def run_settings(info, image_info, secret_patterns):
    """What it takes to create the container again, from GET /containers/<id>/json (secret values left out)."""
    config = info.get("Config") or {}
    kept = {k: config[k] for k in CONFIG_KEYS if config.get(k) not in (None, "", [], {})}
    image_env = ((image_info or {}).get("Config") or {}).get("Env") or []
    kept["Env"], left_out = split_env(config.get("Env"), image_env, secret_patterns)
    if kept.get("Hostname") == info["Id"][:12]:  # the default: the new container gets its own
        del kept["Hostname"]
    host_config = {k: v for k, v in (info.get("HostConfig") or {}).items() if k not in DROPPED_HOST_CONFIG}
    networks = {}
    for name, network in ((info.get("NetworkSettings") or {}).get("Networks") or {}).items():
        if name in BUILTIN_NETWORKS:
            continue
        endpoint = network or {}
        aliases = [a for a in endpoint.get("Aliases") or [] if a != info["Id"][:12]]
        networks[name] = {k: v for k, v in (("Aliases", aliases), ("IPAMConfig", endpoint.get("IPAMConfig"))) if v}
    state = info.get("State") or {}
    return {
        "name": info["Name"].lstrip("/"),
        "image": config.get("Image"),
        "image_id": info.get("Image"),
        "running": bool(state.get("Running")),
        "config": kept,
        "host_config": host_config,
        "networks": networks,
        "mounts": [
            {
                "type": m.get("Type"),
                "source": m.get("Source") or m.get("Name"),
                "destination": m.get("Destination"),
                "rw": m.get("RW"),
            }
            for m in info.get("Mounts") or []
        ],
        "secret_env": left_out,
    }


def redact_config(config_bytes, secret_names):
    """The image config with the secret variables taken out of config.Env and container_config.Env (a commit copies
    the container's environment into the image). Returns the bytes unchanged when there is nothing to take out."""
    if not secret_names:
        return config_bytes
    config = json.loads(config_bytes)
    for key in ("config", "container_config"):
        section = config.get(key) or {}
        if section.get("Env"):
            section["Env"] = [e for e in section["Env"] if env_name(e) not in secret_names]
    return json.dumps(config, separators=(",", ":")).encode()


# ---- bind-mounted folders and files --------------------------------------------------------------------------------
