# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT
"""Filters of the notebook role: every decision about the students' notebook containers, in plain Python.

The role gathers what it needs from the server (accounts, GPUs, paths, containers, listening ports, the Jupyter of
each image) and hands it to these functions, which validate notebook_users as a whole and return what to create.
tests/unit/test_notebook_filters.py feeds them directly.

Secrets (token, password, password_hash) go in, but only three functions give anything derived from them back:
notebook_jupyter_config (the config file's content), notebook_access_sheet (the control node's access sheet) and
notebook_password_hash. The role calls those only in tasks with no_log. notebook_plan's result holds no secret, so
it may be shown, registered and looped over; its error messages never quote a secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import posixpath
import re

from ansible.errors import AnsibleFilterError

# Jupyter listens on this port inside every container; notebook_users[].port is the host's side.
CONTAINER_PORT = 8888
# The user's config folder on the host is mounted here, read-only; Jupyter reads its file through --config.
CONFIG_MOUNT = "/etc/gpulab-notebook"
# ... and the file, named on Jupyter's command line (--config): one name for every flavour. Jupyter then reads it
# instead of jupyter_notebook_config / jupyter_server_config from its config path; the student's own ~/.jupyter
# cannot override it.
CONFIG_FILE = "gpulab_jupyter_config.json"
LABEL_USER = "io.gpulab.notebook.user"
LABEL_ROLE = "io.gpulab.notebook"
# The resource limits, also as a label: a new limit changes the label, so the container is recreated with it.
# (docker update, which community.docker's docker_container would use otherwise, cannot remove a limit and refuses to
# raise the memory limit above the swap limit set at creation.)
LABEL_LIMITS = "io.gpulab.notebook.limits"
# The image the lab configured for the notebook, recorded on the container; and the label module container_restore
# puts on a container it rebuilt from a backup (its image is then the backup's, holding what the student installed).
LABEL_IMAGE = "io.gpulab.notebook.image"
LABEL_RESTORED = "io.gpulab.backup.restored-from"
LIMITS = ("memory", "cpus", "shm_size")

FLAVOURS = ("notebook6", "jupyter_server1", "jupyter_server2")
FRONTENDS = ("notebook", "lab")
STATES = ("started", "stopped", "absent")
IPC_MODES = ("host", "private", "shareable")
AUTH_MODES = ("required", "none")
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
}
SECRET_KEYS = ("token", "password", "password_hash")

NAME_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
TOKEN_RE = re.compile(r"^[A-Za-z0-9._~-]{16,}$")
SIZE_RE = re.compile(r"^[0-9]+[bkmgBKMG]?$")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
GPU_UUID_RE = re.compile(r"^(GPU|MIG)-[0-9A-Za-z-]+$")
# Jupyter's own password hash formats: argon2:<argon2 encoded hash>, or <hashlib algorithm>:<salt>:<hex digest>.
ARGON2_RE = re.compile(
    r"^argon2:\$argon2(id|i|d)\$v=[0-9]+\$m=[0-9]+,t=[0-9]+,p=[0-9]+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+$"
)
SALTED_RE = re.compile(r"^([a-z0-9_]+):([0-9A-Za-z]+):([0-9a-f]+)$")
# The role makes a workdir the student's (owner, mode), so these can never be one: anything inside these folders...
SYSTEM_PREFIXES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/root", "/run")
SYSTEM_PREFIXES += ("/sbin", "/sys", "/usr")
# ... and "/", every top-level folder (/home, /srv, /data, ...) and every folder directly in /var (/var/lib, ...).


# ---- small helpers ----------------------------------------------------------------------------------------------


def _is_loopback(address):
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _publish_address(address):
    """Docker's published_ports syntax wants IPv6 addresses in brackets."""
    return f"[{address}]" if ":" in address else address


def _is_wildcard(address):
    """Whether a listening address means every address of the host (0.0.0.0, ::, * or empty)."""
    if address in ("", "*"):
        return True
    try:
        return ipaddress.ip_address(address).is_unspecified
    except ValueError:
        return False


def _overlap(first, second):
    """Whether two listening addresses of the same port collide (a wildcard collides with everything)."""
    return first == second or _is_wildcard(first) or _is_wildcard(second)


def _valid_port(value):
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def _as_int(value):
    """An int from an int or a string of digits (inventory values arrive as either); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _major(version):
    """'6.4.12' -> 6; None or junk -> None."""
    match = re.match(r"^\s*([0-9]+)", str(version or ""))
    return int(match.group(1)) if match else None


def _has(entry, key):
    """Whether an entry sets key to something (None and '' count as not set)."""
    return entry.get(key) not in (None, "")


def password_hash(password, seed):
    """Jupyter's salted hash format, <algorithm>:<salt>:<hex digest of password + salt>, as notebook.auth.passwd
    and jupyter_server.auth.passwd write it with a hashlib algorithm (both read it back with hashlib.new).

    The salt is derived from the password and `seed` (the server and the user), so that the same password gives the
    same hash on every run (the config file, and so the container, stays unchanged) but a different one for each
    user and server. For a slow hash, give password_hash from `jupyter server passwd` (argon2) instead.
    """
    if not isinstance(password, str) or not password:
        raise AnsibleFilterError("notebook_password_hash needs a non-empty password")
    salt = hmac.new(password.encode(), f"gpulab-notebook\0{seed}".encode(), hashlib.sha256).hexdigest()[:12]
    digest = hashlib.sha256(password.encode() + salt.encode()).hexdigest()
    return f"sha256:{salt}:{digest}"


def _valid_password_hash(value):
    if not isinstance(value, str):
        return False
    if ARGON2_RE.match(value):
        return True
    match = SALTED_RE.match(value)
    return bool(match) and match.group(1) in hashlib.algorithms_guaranteed


def _gpu_requests(spec, gpu_facts):
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
        index = _as_int(item)
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


# ---- the plan ---------------------------------------------------------------------------------------------------


def notebook_plan(users, settings):
    """Validate notebook_users as a whole against the server; return {"users": [...], "errors": [...]}.

    settings: host, bind_address, default_image, frontend, ipc_mode, container_prefix, config_dir,
    gpu (gpu_facts' gpulab_gpu), accounts ({name: [password, uid, gid, ...]} as getent passwd gives it),
    paths ({path: {"exists": bool, "isdir": bool}}, or the role's list of stat results),
    containers (docker's /containers/json entries, all states), listeners (["address:port", ...] of listening TCP
    sockets), nproc (the server's CPUs).

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
    errors.extend(_check_containers(planned, settings))
    _keep_restored_images(planned, settings)
    order = {"absent": 0, "stopped": 1, "started": 2}
    result = [user for _, _, user in sorted(planned, key=lambda p: (order[p[2]["state"]], p[0]))]
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
            "(like a Linux user name); it names the container and the user's folders"
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


def _keep_restored_images(planned, settings):
    """A notebook restored from a backup (playbooks/restore.yml) runs the backup's image, which holds what the student
    installed in the container. While the lab's configured image for that user is still the one the container was made
    from, the plan keeps the restored image (and the restore label), so that the next run of site.yml does not
    recreate the container from the plain image and lose the student's work. A new image in the inventory wins."""
    by_name = {_container_name(c): c for c in settings.get("containers") or []}
    for _, _, user in planned:
        container = by_name.get(user["container"]) or {}
        labels = container.get("Labels") or {}
        if (
            user["state"] != "absent"
            and labels.get(LABEL_USER) == user["name"]
            and labels.get(LABEL_RESTORED)
            and labels.get(LABEL_IMAGE) == user["image"]
            and container.get("Image")
        ):
            user["restored_from"] = labels[LABEL_RESTORED]
            user["image"] = container["Image"]
            user["labels"][LABEL_RESTORED] = labels[LABEL_RESTORED]


def _plan_port(entry, user, settings):
    errors = []
    port = _as_int(entry.get("port"))
    if entry.get("port") is None:
        errors.append("port (the server's port of the notebook) is missing")
    elif not _valid_port(port):
        errors.append(f"port must be a number from 1 to 65535, not {entry.get('port')!r}")
    local_port = port
    if entry.get("local_port") is not None:
        local_port = _as_int(entry.get("local_port"))
        if not _valid_port(local_port):
            errors.append(f"local_port must be a number from 1 to 65535, not {entry.get('local_port')!r}")
    bind = str(settings.get("bind_address") or "127.0.0.1")
    try:
        ipaddress.ip_address(bind)
    except ValueError:
        errors.append(f"notebook_bind_address {bind!r} is not an IP address")
    user.update(port=port, local_port=local_port, bind_address=bind, loopback=_is_loopback(bind))
    user["publish"] = f"{_publish_address(bind)}:{port}:{CONTAINER_PORT}"
    return errors


def _secret_format_errors(entry):
    errors = []
    if _has(entry, "token") and (not isinstance(entry["token"], str) or not TOKEN_RE.match(entry["token"])):
        errors.append(
            "the token must be at least 16 characters of A-Z, a-z, 0-9, '.', '_', '~' and '-' (it goes into a URL), "
            "for example from: openssl rand -hex 24"
        )
    if _has(entry, "password") and _has(entry, "password_hash"):
        errors.append("give password or password_hash, not both")
    if _has(entry, "password") and not isinstance(entry["password"], str):
        errors.append("the password must be a string (quote it in YAML)")
    if _has(entry, "password_hash") and not _valid_password_hash(entry["password_hash"]):
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
    if not kinds:
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
    uid, gid = _as_int(entry.get("uid")), _as_int(entry.get("gid"))
    for key, value in (("uid", uid), ("gid", gid)):
        if entry.get(key) is not None and value is None:
            errors.append(f"{key} must be a number, not {entry.get(key)!r}")
    if entry.get("uid") is None:
        if account:
            uid = _as_int(account[1])
        else:
            errors.append(
                f"{user['name']} is not a user on {settings.get('host') or 'the server'}; create the account first, "
                "or give uid (and gid) for the notebook's files"
            )
    if entry.get("gid") is None:
        same_account = account and _as_int(account[1]) == uid
        gid = _as_int(account[2]) if same_account else uid
    if uid == 0 or gid == 0:
        errors.append(
            "uid and gid 0 (root) are refused: the notebook would write its files as root on the host; give the "
            "student's uid and gid"
        )
    user.update(uid=uid, gid=gid, user=f"{uid}:{gid}", ssh_user=entry.get("ssh_user") or user["name"])
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
        if _system_folder(workdir):
            errors.append(
                f"workdir {workdir} is a system or top-level folder; the role makes the workdir the student's, so "
                "give a folder of its own, e.g. /srv/notebooks/<name>"
            )
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
    parent = (settings.get("paths") or {}).get(posixpath.dirname(workdir)) if workdir else None
    # Unknown (never looked at): taken as there, so that the role never changes an existing folder's owner or mode.
    user.update(workdir=workdir, container_workdir=container_workdir, parent_exists=(parent or {}).get("exists", True))
    user["mounts"] = [
        {"type": "bind", "source": workdir, "target": container_workdir, "read_only": False},
        {"type": "bind", "source": user["config_dir"], "target": CONFIG_MOUNT, "read_only": True},
    ]
    return errors


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
    display, requests, gpu_errors = _gpu_requests(entry.get("gpus", "none"), settings.get("gpu") or {})
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
    nproc = _as_int(settings.get("nproc"))
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
        errors.append("env must be a dictionary of variable names and values")
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
    user["env"] = {"HOME": user["container_workdir"]}
    user["env"].update({str(key): "" if value is None else str(value) for key, value in env.items()})
    return errors


def _check_together(planned):
    """Errors between entries: names, ports and workdirs used twice."""
    errors = []
    seen_names, seen_ports, seen_workdirs = {}, {}, {}
    for _, where, user in planned:
        if user["name"] in seen_names:
            errors.append(f"{where}: the name {user['name']} is already used by {seen_names[user['name']]}")
        seen_names.setdefault(user["name"], where)
        if user["state"] == "absent":
            continue
        port = user.get("port")
        if _valid_port(port) and port in seen_ports:
            errors.append(f"{where}: port {port} is already used by {seen_ports[port]}")
        if _valid_port(port):
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


def _container_name(container):
    names = container.get("Names") or []
    return names[0].lstrip("/") if names else str(container.get("Id", ""))[:12]


def _published(container):
    """(address, port) of each TCP port a running container publishes."""
    return [
        (str(port.get("IP") or ""), int(port["PublicPort"]))
        for port in container.get("Ports") or []
        if port.get("PublicPort") and (port.get("Type") or "tcp") == "tcp"
    ]


def _check_containers(planned, settings):
    """Errors against what runs on the server: containers gpulab does not manage, and other listening programs."""
    wanted = {user["name"]: (where, user) for _, where, user in planned}
    active = [
        (where, user) for where, user in wanted.values() if user["state"] != "absent" and _valid_port(user["port"])
    ]
    containers = settings.get("containers") or []
    errors = []
    for container in containers:
        name = _container_name(container)
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
    published = {port for container in containers for _, port in _published(container)}
    listeners = [str(listener) for listener in settings.get("listeners") or []]
    for where, user in active:
        if user["port"] in published:
            continue  # docker-proxy's own socket of a published port: the containers are checked above
        for listener in listeners:
            address, _, port_text = listener.rpartition(":")
            if _as_int(port_text) == user["port"] and _overlap(address.strip("[]"), user["bind_address"]):
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
        f"{name}, gpulab's notebook of {owner}, who is no longer in notebook_users; add {{name: {owner}, state: "
        "absent}} to remove it, or choose another port"
    )


# ---- Jupyter ----------------------------------------------------------------------------------------------------


def _versions(text):
    """The probe's JSON ({"notebook": "6.4.12", "jupyter_server": null, ...}) from its output, or None."""
    try:
        versions = json.loads(str(text or "").strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    if not isinstance(versions, dict) or not set(versions) >= {"notebook", "jupyter_server", "jupyterlab"}:
        return None
    return versions


def notebook_flavours(probed, declared=None, cached=None):
    """Per image, what Jupyter it has: {image: {"flavour": ...} or {"versions": {...}} or {"error": ...}}.

    probed: the role's probe runs (registered loop results of `docker run --rm IMAGE python3 -c ...`: item = the
    image, rc, stdout, stderr). declared: notebook_images ({image: {flavour, python}}), never probed. cached: the
    role's slurp results of earlier runs' findings (item = the image, content = base64 of the probe's JSON).
    "versions" entries that come from `probed` also carry "new": true (the role caches those).
    """
    found = {}
    for image, info in (declared or {}).items():
        flavour = (info or {}).get("flavour")
        if flavour not in FLAVOURS:
            found[image] = {"error": f"notebook_images[{image!r}].flavour must be one of {', '.join(FLAVOURS)}"}
        else:
            found[image] = {"flavour": flavour}
    for result in cached or []:
        if result.get("content") and result.get("item") not in found:
            versions = _versions(base64.b64decode(result["content"]).decode(errors="replace"))
            if versions is not None:
                found[result["item"]] = {"versions": versions}
    for result in probed or []:
        image = result.get("item")
        if image in found or result.get("skipped") or "rc" not in result:
            continue
        versions = _versions(result.get("stdout")) if result.get("rc") == 0 else None
        if versions is None:
            detail = " ".join(str(result.get("stderr") or result.get("msg") or result.get("stdout") or "").split())
            found[image] = {
                "error": f"could not ask the image {image} which Jupyter it has ({detail[-300:]}); declare it in "
                "notebook_images ({flavour: notebook6 | jupyter_server1 | jupyter_server2, python: ...})"
            }
        else:
            found[image] = {"versions": versions, "new": True}
    return found


def notebook_image_ids(images, names):
    """{name: image ID} for the names (repository:tag or repository@digest) that docker_image_info found."""
    ids = {}
    for image in images or []:
        for name in (image.get("RepoTags") or []) + (image.get("RepoDigests") or []):
            if name in names:
                ids[name] = image["Id"]
    return ids


def _flavour_for(info, frontend, image):
    """(flavour, error) for one user's frontend on an image of `info` (from notebook_flavours)."""
    if "error" in info or "flavour" in info:
        return info.get("flavour"), info.get("error")
    versions = info.get("versions") or {}
    if frontend == "lab":
        lab = versions.get("jupyterlab")
        if lab is None:
            return None, f"the image {image} has no JupyterLab (python module jupyterlab); use frontend: notebook"
        if (_major(lab) or 0) < 3:
            return "notebook6", None  # JupyterLab 1 and 2 run on the classic Notebook server
        return ("jupyter_server2" if (_major(versions.get("jupyter_server")) or 0) >= 2 else "jupyter_server1"), None
    notebook = versions.get("notebook")
    if notebook is None:
        hint = "; use frontend: lab" if versions.get("jupyterlab") is not None else ""
        return None, f"the image {image} has no Jupyter Notebook (python module notebook){hint}"
    return ("notebook6" if (_major(notebook) or 0) < 7 else "jupyter_server2"), None


def notebook_commands(plan_users, flavours, images=None, python="python3"):
    """Add each user's flavour, config file and Jupyter command line; return {"users": [...], "errors": [...]}.

    Every command line has --no-browser --ip=0.0.0.0 --port=8888 --allow-root --notebook-dir=<container_workdir>
    and --config=<the read-only config file with the secrets>; nothing secret is on it.
    """
    users, errors = [], []
    for planned in plan_users:
        user = dict(planned)
        users.append(user)
        if user["state"] == "absent":
            continue
        info = flavours.get(user["image"])
        if info is None:
            errors.append(f"notebook_users {user['name']}: the image {user['image']} was not examined")
            continue
        flavour, error = _flavour_for(info, user["frontend"], user["image"])
        if error:
            errors.append(f"notebook_users {user['name']}: {error}")
            continue
        image_python = ((images or {}).get(user["image"]) or {}).get("python") or python
        config_file = CONFIG_FILE
        module = "jupyterlab" if user["frontend"] == "lab" else "notebook"
        command = [image_python, "-m", module, "--no-browser", "--ip=0.0.0.0", f"--port={CONTAINER_PORT}"]
        command += ["--allow-root", f"--notebook-dir={user['container_workdir']}"]
        command += [f"--config={CONFIG_MOUNT}/{config_file}"]
        user.update(flavour=flavour, config_file=config_file, command=command)
    return {"users": users, "errors": errors}


def _entry(users, name):
    for entry in users or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry
    raise AnsibleFilterError(f"notebook_users has no entry {name!r}")


def notebook_jupyter_config(users, user, seed):
    """The JSON config file for one user's notebook (holds the secrets; write it only in a task with no_log).

    users: notebook_users (with the secrets); user: that user's planned entry (with flavour); seed: a string that
    differs per server, for the password's salt.
    """
    entry = _entry(users, user["name"])
    token = entry.get("token") or ""
    hashed = entry.get("password_hash") or ""
    if not hashed and entry.get("password"):
        hashed = password_hash(str(entry["password"]), f"{seed}\0{user['name']}")
    required = entry.get("auth", "required") != "none"
    flavour = user["flavour"]
    if flavour == "notebook6":
        config = {
            "NotebookApp": {
                "token": token,
                "password": hashed,
                "password_required": required and bool(hashed),
                "allow_password_change": False,
            }
        }
    elif flavour == "jupyter_server1":
        config = {
            "ServerApp": {
                "token": token,
                "password": hashed,
                "password_required": required and bool(hashed),
                "allow_password_change": False,
            }
        }
    elif flavour == "jupyter_server2":
        config = {
            "IdentityProvider": {"token": token},
            "PasswordIdentityProvider": {
                "hashed_password": hashed,
                "password_required": required and bool(hashed),
                "allow_password_change": False,
            },
        }
    else:
        raise AnsibleFilterError(f"unknown Jupyter flavour {flavour!r}")
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


# ---- what the people get ----------------------------------------------------------------------------------------


def _ssh_command(user, server, ssh_port):
    port = f"-p {ssh_port} " if ssh_port and int(ssh_port) != 22 else ""
    target = "127.0.0.1" if user["loopback"] or _is_wildcard(user["bind_address"]) else user["bind_address"]
    target = f"[{target}]" if ":" in target else target
    return f"ssh {port}-L {user['local_port']}:{target}:{user['port']} {user['ssh_user']}@{server}"


def notebook_access_sheet(plan_users, users, server, ssh_port=22, host=""):
    """The access sheet of one server: per user the ssh -L command and the URL (with the token). Holds secrets."""
    lines = [
        f"# gpulab notebooks on {host or server}: how each student reaches theirs. Written by Ansible (role",
        "# notebook); it holds the notebooks' tokens: keep it private, give each student their own part only.",
        "# On the laptop: run the ssh command (it keeps running; add -N for no shell), then open the URL.",
        "",
    ]
    for user in sorted(plan_users, key=lambda u: u["name"]):
        if user["state"] == "absent":
            continue
        entry = _entry(users, user["name"])
        url = f"http://localhost:{user['local_port']}/"
        if entry.get("token"):
            url += f"?token={entry['token']}"
        lines.append(f"[{user['name']}]")
        lines.append(f"ssh: {_ssh_command(user, server, ssh_port)}")
        lines.append(f"url: {url}")
        login = {"token": "the token in the URL", "none": "no login (only through the tunnel)"}.get(
            user["auth"], "the URL, then the notebook password (not written here)"
        )
        if user["auth"] == "token and password":
            login = "the token in the URL, or the notebook password"
        lines.append(f"login: {login}")
        lines.append(f"state: {user['state']}; container {user['container']}; GPUs {user['gpus']}")
        lines.append(f"files: {user['workdir']} on the server, {user['container_workdir']} in the notebook")
        lines.append("")
    return "\n".join(lines)


def notebook_summary(plan_users, server, ssh_port=22, sheet=""):
    """One line per user for the end of the play, without secrets."""
    lines = []
    for user in plan_users:
        if user["state"] == "absent":
            lines.append(f"{user['name']}: removed (container {user['container']}; the workdir is kept)")
            continue
        lines.append(
            f"{user['name']}: {user['state']}, port {user['port']}, GPUs {user['gpus']}, login by {user['auth']}; "
            f"{_ssh_command(user, server, ssh_port)} then http://localhost:{user['local_port']}/"
            + (f" (URL with token: {sheet})" if "token" in user["auth"] else "")
        )
    return lines


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


class FilterModule:
    def filters(self):
        return {
            "notebook_plan": notebook_plan,
            "notebook_flavours": notebook_flavours,
            "notebook_commands": notebook_commands,
            "notebook_jupyter_config": notebook_jupyter_config,
            "notebook_password_hash": password_hash,
            "notebook_access_sheet": notebook_access_sheet,
            "notebook_summary": notebook_summary,
            "notebook_listeners": notebook_listeners,
            "notebook_workdirs": notebook_workdirs,
            "notebook_image_ids": notebook_image_ids,
        }
