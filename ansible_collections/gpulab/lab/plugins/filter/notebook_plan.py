# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT
"""Filters of the notebook role that decide what to create: notebook_users checked as a whole against the server
(accounts, GPUs, paths and their file systems, containers, listening ports), and the plan of each user's container.

The role gathers what it needs from the server and hands it to notebook_plan, which returns the users to apply and
every problem at once. Secrets (token, password, password_hash) go in, but the plan's result holds none, so it may be
shown, registered and looped over; its error messages never quote a secret. Jupyter's side (flavours, command lines,
the config with the secrets) is in notebook_jupyter.py, the access sheet in notebook_access.py.
tests/unit/test_notebook_filters.py feeds these functions directly.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re

from ansible.errors import AnsibleFilterError

from ansible_collections.gpulab.lab.plugins.filter.notebook_jupyter import (
    CONFIG_MOUNT,
    CONTAINER_PORT,
    FRONTENDS,
    valid_password_hash,
)
from ansible_collections.gpulab.lab.plugins.filter.notebook_server import (
    LIMITS,
    as_int,
    check_containers,
    filesystem_of,
    gpu_requests,
    is_loopback,
    note_restored,
    publish_address,
    valid_port,
)
from ansible_collections.gpulab.lab.plugins.module_utils.notebook.desired import (
    LABEL_IMAGE,
    LABEL_LIMITS,
    LABEL_ROLE,
    LABEL_USER,
)

STATES = ("started", "stopped", "absent")
IPC_MODES = ("host", "private", "shareable")
AUTH_MODES = ("required", "none")
IMAGE_POLICIES = ("keep", "rebase", "replace")
ENTRY_KEYS = {
    "name",
    "port",
    "local_port",
    "workdir",
    "container_workdir",
    "gpus",
    "token",
    "password",
    "password_hash",
    "auth",
    "image",
    "frontend",
    "state",
    "memory",
    "cpus",
    "shm_size",
    "ipc_mode",
    "env",
    "uid",
    "gid",
    "ssh_user",
    "image_policy",
}
SECRET_KEYS = ("token", "password", "password_hash")

NAME_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
TOKEN_RE = re.compile(r"^[A-Za-z0-9._~-]{16,}$")
SIZE_RE = re.compile(r"^[0-9]+[bkmgBKMG]?$")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# The role makes a workdir the student's (owner, mode), so these can never be one: anything inside these folders...
SYSTEM_PREFIXES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/root", "/run")
SYSTEM_PREFIXES += ("/sbin", "/sys", "/usr")
# ... and "/", every top-level folder (/home, /srv, /data, ...) and every folder directly in /var (/var/lib, ...).
# Folders the server empties (at boot, or of files left unused for some days), and file systems that live in memory:
# a workdir there would lose the student's files.
TEMPORARY_FOLDERS = ("/tmp", "/var/tmp", "/run", "/dev/shm")  # noqa: S108 (paths refused)
MEMORY_FILE_SYSTEMS = ("tmpfs", "ramfs")
SSH_USER_RE = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._@-]*$")


def _has(entry, key):
    """Whether an entry sets key to something (None and '' count as not set)."""
    return entry.get(key) not in (None, "")


# ---- the plan ---------------------------------------------------------------------------------------------------


def notebook_plan(users, settings):
    """Validate notebook_users as a whole against the server; return {"users": [...], "errors": [...]}.

    settings: host, bind_address, default_image, frontend, ipc_mode, image_policy, container_prefix, config_dir,
    gpu (gpu_facts' gpulab_gpu), accounts ({name: [password, uid, gid, ...]} as getent passwd gives it),
    paths ({path: {"exists": bool, "isdir": bool}}, or the role's list of stat results),
    containers (docker's /containers/json entries, all states), listeners (["address:port", ...] of listening TCP
    sockets), mounts ({mount point: file system type}, notebook_mounts), nproc (the server's CPUs).

    Each returned user holds no secret; the users come in the order to apply them: absent, then stopped, then
    started (so that ports and GPUs are freed before they are taken).
    """
    if not isinstance(users, list):
        raise AnsibleFilterError(f"notebook_users must be a list, not {type(users).__name__}")
    settings = dict(settings or {})
    paths = settings.get("paths") or {}
    if isinstance(paths, list):  # the role's registered stat results: [{item: path, stat: {exists, isdir, ...}}]
        paths = {result.get("item"): result.get("stat") or {} for result in paths if isinstance(result, dict)}
    settings["paths"] = paths
    errors, planned = [], []
    for position, entry in enumerate(users, start=1):
        where = f"notebook_users entry {position}"
        if not isinstance(entry, dict):
            errors.append(f"{where} is not a dictionary (name, port, workdir, ...)")
            continue
        if isinstance(entry.get("name"), str):
            where += f" ({entry['name']})"
        user, entry_errors = _plan_entry(entry, where, settings)
        errors.extend(entry_errors)
        if user:
            planned.append((position, where, user))
    errors.extend(_check_together(planned))
    errors.extend(check_containers(planned, settings))
    note_restored(planned, settings)
    order = {"absent": 0, "stopped": 1, "started": 2}
    result = [user for _position, _where, user in sorted(planned, key=lambda p: (order[p[2]["state"]], p[0]))]
    return {"users": result, "errors": errors}


def _plan_entry(entry, where, settings):
    """(the user's plan or None, the entry's errors)."""
    errors = []
    unknown = sorted(set(entry) - ENTRY_KEYS)
    if unknown:
        errors.append(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(ENTRY_KEYS))}")
    name = entry.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        errors.append(
            f"{where}: the name must be 1 to 32 characters of a-z, 0-9, _ and -, starting with a letter or _ "
            f"(like a Linux user name), not {name!r}; it names the container and the user's folders"
        )
        return None, errors
    state = entry.get("state") or "started"
    if state not in STATES:
        errors.append(f"{where}: state must be one of {', '.join(STATES)}, not {state!r}")
        return None, errors
    prefix = settings.get("container_prefix", "notebook-")
    user = {"name": name, "state": state, "container": f"{prefix}{name}", "image": "", "port": None}
    user["config_dir"] = posixpath.join(str(settings.get("config_dir") or "/etc/gpulab/notebook"), name)
    if state == "absent":
        return user, errors
    for step in (_plan_port, _plan_auth, _plan_owner, _plan_folders, _plan_jupyter, _plan_resources, _plan_env):
        errors.extend(f"{where}: {error}" for error in step(entry, user, settings))
    limits = " ".join(f"{key}={user[key] if user[key] is not None else 'none'}" for key in LIMITS)
    user["labels"] = {LABEL_ROLE: "1", LABEL_USER: name, LABEL_LIMITS: limits, LABEL_IMAGE: user["image"]}
    return user, errors


def _plan_port(entry, user, settings):
    errors = []
    port = as_int(entry.get("port"))
    if entry.get("port") is None:
        errors.append("port (the server's port of the notebook) is missing")
    elif not valid_port(port):
        errors.append(f"port must be a number from 1 to 65535, not {entry.get('port')!r}")
    local_port = port
    if entry.get("local_port") is not None:
        local_port = as_int(entry.get("local_port"))
        if not valid_port(local_port):
            errors.append(f"local_port must be a number from 1 to 65535, not {entry.get('local_port')!r}")
    bind = str(settings.get("bind_address") or "127.0.0.1")
    try:
        ipaddress.ip_address(bind)
    except ValueError:
        errors.append(f"notebook_bind_address {bind!r} is not an IP address")
    user.update(port=port, local_port=local_port, bind_address=bind, loopback=is_loopback(bind))
    user["publish"] = f"{publish_address(bind)}:{port}:{CONTAINER_PORT}"
    return errors


def _secret_format_errors(entry):
    errors = []
    for key in SECRET_KEYS:
        if key in entry and entry[key] in (None, ""):
            value = "null" if entry[key] is None else "''"
            errors.append(
                f"{key} is {value} (empty): give the {key.replace('_', ' ')} or leave the key out (an empty value is "
                "often a Vault variable that is not set)"
            )
    if _has(entry, "token") and (not isinstance(entry["token"], str) or not TOKEN_RE.match(entry["token"])):
        errors.append(
            "the token must be at least 16 characters of A-Z, a-z, 0-9, '.', '_', '~' and '-' (it goes into a URL), "
            "for example from: openssl rand -hex 24"
        )
    if _has(entry, "password") and _has(entry, "password_hash"):
        errors.append("give password or password_hash, not both")
    if _has(entry, "password") and not isinstance(entry["password"], str):
        errors.append("the password must be a string (quote it in YAML)")
    if _has(entry, "password_hash") and not valid_password_hash(entry["password_hash"]):
        errors.append(
            "password_hash is not a Jupyter password hash: expected argon2:$argon2id$... (from jupyter server passwd, "
            "or notebook.auth.passwd()) or <algorithm>:<salt>:<hex digest> such as sha1:..."
        )
    return errors


def _plan_auth(entry, user, _settings):
    """Never a notebook that anyone who reaches its port can use."""
    errors = _secret_format_errors(entry)
    auth = entry.get("auth") or "required"
    has_token = _has(entry, "token")
    has_password = _has(entry, "password") or _has(entry, "password_hash")
    bind = user["bind_address"]
    if auth not in AUTH_MODES:
        errors.append(f"auth must be required or none, not {auth!r}")
    if auth == "none":
        user["auth"] = "none"
        if has_token or has_password:
            errors.append("auth is none, but the entry also has a token or password; remove one or the other")
        elif not user["loopback"]:
            errors.append(
                f"auth: none is only allowed with a loopback notebook_bind_address (127.0.0.1 or ::1), not {bind}: "
                f"anyone who reaches {bind}:{user['port']} would run code on the server"
            )
        return errors
    kinds = [kind for kind, on in (("token", has_token), ("password", has_password)) if on]
    user["auth"] = " and ".join(kinds) or "missing"
    if not kinds and not any(key in entry for key in SECRET_KEYS):  # an empty one is reported above
        errors.append(
            "no token and no password: give token (a long random string, e.g. openssl rand -hex 24), password or "
            "password_hash (from Ansible Vault); only with a loopback bind address may an entry opt out with auth: none"
        )
    elif not user["loopback"] and not has_password:
        errors.append(
            f"notebook_bind_address {bind} is not a loopback address, so the notebook is reachable from the network "
            "without the SSH tunnel; that needs a password (password or password_hash), not only a token"
        )
    return errors


def _plan_owner(entry, user, settings):
    """The uid and gid the notebook runs as, which own its workdir: the account's, or the entry's."""
    errors = []
    account = (settings.get("accounts") or {}).get(user["name"])
    uid, gid = as_int(entry.get("uid")), as_int(entry.get("gid"))
    for key, value in (("uid", uid), ("gid", gid)):
        if entry.get(key) is not None and value is None:
            errors.append(f"{key} must be a number, not {entry.get(key)!r}")
    if entry.get("uid") is None:
        if account:
            uid = as_int(account[1])
        else:
            errors.append(
                f"{user['name']} is not a user on {settings.get('host') or 'the server'}; create the account first, "
                "or give uid (and gid) for the notebook's files"
            )
    if entry.get("gid") is None:
        same_account = account and as_int(account[1]) == uid
        gid = as_int(account[2]) if same_account else uid
    if uid == 0 or gid == 0:
        errors.append(
            "uid and gid 0 (root) are refused: the notebook would write its files as root on the host; give the "
            "student's uid and gid"
        )
    ssh_user = entry.get("ssh_user")
    if ssh_user is not None and not (isinstance(ssh_user, str) and SSH_USER_RE.match(ssh_user)):
        errors.append(f"ssh_user must be the student's SSH login name, not {ssh_user!r}")
        ssh_user = None
    user.update(uid=uid, gid=gid, user=f"{uid}:{gid}", ssh_user=ssh_user or user["name"])
    return errors


def _plan_folders(entry, user, settings):
    errors = []
    workdir = entry.get("workdir")
    if not _has(entry, "workdir"):
        errors.append("workdir (the folder on the server for the notebook's files) is missing")
        workdir = None
    elif not isinstance(workdir, str) or not posixpath.isabs(workdir):
        errors.append(f"workdir must be an absolute path, not {workdir!r}")
        workdir = None
    else:
        workdir = posixpath.normpath(workdir)
        errors.extend(_workdir_place_errors(workdir, user["name"], settings))
        info = (settings.get("paths") or {}).get(workdir) or {}
        if info.get("exists") and not info.get("isdir"):
            errors.append(f"workdir {workdir} exists on the server and is not a folder")
    container_workdir = entry.get("container_workdir") or "/workspace"
    if not isinstance(container_workdir, str) or not posixpath.isabs(container_workdir):
        errors.append(f"container_workdir must be an absolute path, not {container_workdir!r}")
        container_workdir = "/workspace"
    container_workdir = posixpath.normpath(container_workdir)
    if container_workdir == "/" or (container_workdir + "/").startswith(CONFIG_MOUNT + "/"):
        errors.append(f"container_workdir {container_workdir} would hide a folder the notebook needs")
    paths = settings.get("paths") or {}
    parent = paths.get(posixpath.dirname(workdir)) if workdir else None
    # Unknown (never looked at): taken as there, so that the role never changes an existing folder's owner or mode.
    user.update(workdir=workdir, container_workdir=container_workdir, parent_exists=(parent or {}).get("exists", True))
    user["workdir_exists"] = bool((paths.get(workdir) or {}).get("exists")) if workdir else False
    user["mounts"] = [
        {"type": "bind", "source": workdir, "target": container_workdir, "read_only": False},
        {"type": "bind", "source": user["config_dir"], "target": CONFIG_MOUNT, "read_only": True},
    ]
    return errors


def _workdir_place_errors(workdir, name, settings):
    """A workdir must be a folder of its own on a disk: not a system folder, not one the server empties."""
    advice = f"give a folder on a disk, e.g. /srv/notebooks/{name}"
    temporary = next((top for top in TEMPORARY_FOLDERS if workdir == top or workdir.startswith(top + "/")), None)
    if temporary:
        return [
            f"workdir {workdir} is under {temporary}, which the server empties (at boot, or of files left unused for "
            f"days): the student's files would be lost; {advice}"
        ]
    if _system_folder(workdir):
        return [
            f"workdir {workdir} is a system or top-level folder; the role makes the workdir the student's, so "
            f"give a folder of its own, e.g. /srv/notebooks/{name}"
        ]
    mount_point, fstype = filesystem_of(workdir, settings.get("mounts"))
    if fstype in MEMORY_FILE_SYSTEMS:
        return [
            f"workdir {workdir} is on a {fstype} ({mount_point}), which the server empties at every boot (it lives in "
            f"memory): the student's files would be lost; {advice}"
        ]
    return []


def _system_folder(path):
    """Whether a normalised absolute path is one the role must never hand to a student."""
    inside = any(path == prefix or path.startswith(prefix + "/") for prefix in SYSTEM_PREFIXES)
    return inside or path.count("/") < 2 or posixpath.dirname(path) == "/var"


def _full_image_name(image):
    """The name as docker lists it in RepoTags: a name without tag or digest means :latest."""
    if not image or "@" in image or ":" in image.rsplit("/", 1)[-1]:
        return image
    return f"{image}:latest"


def _plan_jupyter(entry, user, settings):
    errors = []
    display, requests, gpu_errors = gpu_requests(entry.get("gpus", "none"), settings.get("gpu") or {})
    errors.extend(gpu_errors)
    user.update(gpus=display, device_requests=requests)
    image = _full_image_name(str(entry.get("image") or settings.get("default_image") or ""))
    if not image or image.endswith(":auto"):
        errors.append(
            f"no image: the default is role deepo's image, whose tag ({image or 'unset'}) is not resolved in this "
            "run; run playbooks/deepo.yml before playbooks/notebook.yml in the same ansible-playbook run (site.yml "
            "does), or set deepo_image_tag, notebook_image or the entry's image"
        )
    frontend = entry.get("frontend") or settings.get("frontend") or "notebook"
    if frontend not in FRONTENDS:
        errors.append(f"frontend must be notebook or lab, not {frontend!r}")
    user.update(image=image, frontend=frontend)
    policy = entry.get("image_policy") or settings.get("image_policy") or "keep"
    if policy not in IMAGE_POLICIES:
        errors.append(f"image_policy must be one of {', '.join(IMAGE_POLICIES)}, not {policy!r}")
    user["image_policy"] = policy
    return errors


def _plan_resources(entry, user, settings):
    errors = []
    for key in ("memory", "shm_size"):
        value = entry.get(key)
        user[key] = None if value in (None, "") else str(value)
        if user[key] is not None and not SIZE_RE.match(user[key]):
            errors.append(f"{key} must be a size such as 512m or 16g, not {value!r}")
            user[key] = None
    user["cpus"] = None
    nproc = as_int(settings.get("nproc"))
    if entry.get("cpus") not in (None, ""):
        try:
            user["cpus"] = float(entry["cpus"])
        except (TypeError, ValueError):
            errors.append(f"cpus must be a number such as 2 or 1.5, not {entry['cpus']!r}")
        else:
            if user["cpus"] <= 0 or (nproc and user["cpus"] > nproc):
                errors.append(f"cpus must be more than 0 and at most the server's {nproc} CPUs, not {entry['cpus']}")
    ipc_mode = entry.get("ipc_mode") or settings.get("ipc_mode") or "host"
    if ipc_mode not in IPC_MODES:
        errors.append(f"ipc_mode must be one of {', '.join(IPC_MODES)}, not {ipc_mode!r}")
    if ipc_mode == "host" and user["shm_size"]:
        errors.append(
            "shm_size has no effect with ipc_mode host (the container uses the host's /dev/shm); remove it, or set "
            "ipc_mode: private"
        )
    user["ipc_mode"] = ipc_mode
    return errors


def _plan_env(entry, user, _settings):
    """The container's environment: never a secret (docker inspect shows it). HOME is the workdir by default."""
    errors = []
    env = entry.get("env") or {}
    if not isinstance(env, dict):
        errors.append(f"env must be a dictionary of variable names and values, not {env!r}")
        env = {}
    bad = sorted(str(key) for key in env if not ENV_RE.match(str(key)))
    if bad:
        errors.append(f"env has invalid variable names: {', '.join(bad)}")
    secret = sorted(str(key) for key in env if str(key) in ("JUPYTER_TOKEN", "JUPYTER_PASSWORD"))
    if secret:
        errors.append(
            f"env must not carry {', '.join(secret)}: docker inspect shows the environment; use token or password, "
            "which the role keeps in a file only the notebook reads"
        )
    if "JUPYTER_RUNTIME_DIR" in env:
        errors.append(
            "env must not set JUPYTER_RUNTIME_DIR: the role keeps Jupyter's runtime files (the token, the kernels' "
            "keys) inside the container, out of the workdir"
        )
    user["env"] = {"HOME": user["container_workdir"]}
    user["env"].update({str(key): "" if value is None else str(value) for key, value in env.items()})
    return errors


def _check_together(planned):
    """Errors between entries: names, ports and workdirs used twice."""
    errors = []
    seen_names, seen_ports, seen_workdirs = {}, {}, {}
    for _position, where, user in planned:
        if user["name"] in seen_names:
            errors.append(f"{where}: the name {user['name']} is already used by {seen_names[user['name']]}")
        seen_names.setdefault(user["name"], where)
        if user["state"] == "absent":
            continue
        port = user.get("port")
        if valid_port(port) and port in seen_ports:
            errors.append(f"{where}: port {port} is already used by {seen_ports[port]}")
        if valid_port(port):
            seen_ports.setdefault(port, where)
        workdir = user.get("workdir")
        for other, other_where in seen_workdirs.items() if workdir else ():
            if workdir == other or workdir.startswith(other + "/") or other.startswith(workdir + "/"):
                errors.append(
                    f"{where}: workdir {workdir} is, or is inside, {other_where}'s workdir {other}; each student "
                    "needs a folder of their own"
                )
        if workdir:
            seen_workdirs.setdefault(workdir, where)
    return errors


class FilterModule:
    def filters(self):
        return {
            "notebook_plan": notebook_plan,
        }
