# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT
"""Filters of the notebook role about Jupyter itself: which Jupyter an image has (its flavour), the command line that
starts it, and the config file that holds the token or password hash (and keeps both out of the container's log).

notebook_jupyter_config and notebook_password_hash give back what is derived from the secrets: the role calls them
only in tasks with no_log. Nothing here looks at the server or at notebook_users as a whole (notebook_plan.py does).
tests/unit/test_notebook_jupyter.py feeds these functions directly.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
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
# ... and its Python sibling (the role's files/gpulab_jupyter_config.py, no secret in it), which Jupyter reads with it:
# traitlets loads <name>.py and <name>.json of a config name. For every flavour, it hides the token in every log line
# (Notebook 6 logs the browser's first request, GET /?token=..., and docker logs shows the log to the docker group)
# and keeps Jupyter's runtime files (the token, the kernels' keys) in the container, out of the workdir.
LOG_FILTER_FILE = "gpulab_jupyter_config.py"

FLAVOURS = ("notebook6", "jupyter_server1", "jupyter_server2")
FRONTENDS = ("notebook", "lab")
# Jupyter's own password hash formats: argon2:<argon2 encoded hash>, or <hashlib algorithm>:<salt>:<hex digest>.
ARGON2_RE = re.compile(
    r"^argon2:\$argon2(id|i|d)\$v=[0-9]+\$m=[0-9]+,t=[0-9]+,p=[0-9]+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+$"
)
SALTED_RE = re.compile(r"^([a-z0-9_]+):([0-9A-Za-z]+):([0-9a-f]+)$")


def _major(version):
    """'6.4.12' -> 6; None or junk -> None."""
    match = re.match(r"^\s*([0-9]+)", str(version or ""))
    return int(match.group(1)) if match else None


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


def valid_password_hash(value):
    if not isinstance(value, str):
        return False
    if ARGON2_RE.match(value):
        return True
    match = SALTED_RE.match(value)
    return bool(match) and match.group(1) in hashlib.algorithms_guaranteed


def entry_of(users, name):
    for entry in users or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry
    raise AnsibleFilterError(f"notebook_users has no entry {name!r}")


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
        user["log_filter_file"] = LOG_FILTER_FILE
        module = "jupyterlab" if user["frontend"] == "lab" else "notebook"
        command = [image_python, "-m", module, "--no-browser", "--ip=0.0.0.0", f"--port={CONTAINER_PORT}"]
        command += ["--allow-root", f"--notebook-dir={user['container_workdir']}"]
        command += [f"--config={CONFIG_MOUNT}/{config_file}"]
        user.update(flavour=flavour, config_file=config_file, command=command)
    return {"users": users, "errors": errors}


def notebook_jupyter_config(users, user, seed):
    """The JSON config file for one user's notebook (holds the secrets; write it only in a task with no_log).

    users: notebook_users (with the secrets); user: that user's planned entry (with flavour); seed: a string that
    differs per server, for the password's salt.
    """
    entry = entry_of(users, user["name"])
    token = entry.get("token") or ""
    hashed = entry.get("password_hash") or ""
    if not hashed and entry.get("password"):
        hashed = password_hash(str(entry["password"]), f"{seed}\0{user['name']}")
    required = entry.get("auth", "required") != "none"
    flavour = user["flavour"]
    if flavour in ("notebook6", "jupyter_server1"):  # the same keys, in NotebookApp and in ServerApp
        app = "NotebookApp" if flavour == "notebook6" else "ServerApp"
        config = {
            app: {
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


def notebook_jupyter_configs(users, plan_users, seed):
    """{name: the JSON config} of every planned user that is not absent (holds the secrets: for a no_log option)."""
    return {
        user["name"]: notebook_jupyter_config(users, user, seed)
        for user in plan_users or []
        if user.get("state") != "absent" and user.get("flavour")
    }


class FilterModule:
    def filters(self):
        return {
            "notebook_jupyter_configs": notebook_jupyter_configs,
            "notebook_flavours": notebook_flavours,
            "notebook_commands": notebook_commands,
            "notebook_jupyter_config": notebook_jupyter_config,
            "notebook_password_hash": password_hash,
            "notebook_image_ids": notebook_image_ids,
        }
