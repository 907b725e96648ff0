#!/usr/bin/python
# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""One GPU server at a glance, read-only: the engine, the GPUs and who holds their memory, each student's notebook
(state, image, GPUs, memory, Jupyter's last activity), and the backups in the server's store.

Why gpulab writes its own module: the facts come from five places that no module joins. community.docker's
docker_host_info and docker_container_info give the engine and containers, but not which student's container holds
memory on which GPU (nvidia-smi's PIDs mapped through /proc/<pid>/cgroup: gpu_facts with processes: true, given to
this module as `gpu`), nor Jupyter's own idea of activity (its /api/status, asked on the notebook's 127.0.0.1 port
with the token from the config role notebook wrote), nor what is in role backup's store (its manifests).

What it owns: reading those sources and joining them per server. It changes nothing anywhere (no container, file or
setting), prints no secret (the token is read, sent in a header to 127.0.0.1 and dropped), and leaves thresholds,
highlights and the report to role status (plugins/filter/status.py). The backup store is read from its files here
(backups/<container>/<id>.json, written last by a backup; blobs/sha256/), not through module_utils/gpulab_backup.py.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: lab_status
short_description: Report a GPU server's engine, GPUs, notebooks and backups, changing nothing
version_added: "0.2.0"
description:
  - Reads, on one server, the Docker engine (version, running, storage driver, free space of its data root), the GPUs
    and which student's container holds memory on each, every notebook container gpulab manages (port, state, image and
    whether the lab's image differs, GPUs, memory, Jupyter's last activity, kernels and connections, idle time, GPU
    memory held), and the backups in role backup's store (last success and its age, last failure and why when the
    timer's journal recorded one, size, free space of the store's disk).
  - Jupyter is asked on the notebook's published port from the server itself (C(/api/status) and C(/api/kernels) with
    C(no_track_activity), so asking does not count as activity), with the token from the student's Jupyter config
    under O(notebook_config_dir). The token is never returned or logged. A notebook with a password and no token
    cannot be asked without logging in; its activity is then reported as unknown, with the reason.
  - Nothing on the server changes; the result is the same in check mode.
author:
  - gpulab developers (!UNKNOWN)
options:
  docker_host:
    description: The Docker engine's socket.
    type: str
    default: unix:///var/run/docker.sock
  gpu:
    description:
      - The C(gpu) result of M(gpulab.lab.gpu_facts) run with O(gpulab.lab.gpu_facts#module:processes=true) on this
        server. Empty, the server's GPUs are not reported.
    type: dict
    default: {}
  gpu_error:
    description: Why M(gpulab.lab.gpu_facts) failed on this server (its message), to report instead of the GPUs.
    type: str
    default: ""
  notebook_config_dir:
    description: Role notebook's O(notebook_config_dir), where each student's Jupyter config (with the token) is.
    type: path
    default: /etc/gpulab/notebook
  configured_images:
    description:
      - The image the lab configures now for each student (name to image), from the inventory. A notebook whose
        container runs another image, or an older image of that name, has an image update pending.
      - A student not named here is compared with the image the lab configured when role notebook last ran (the
        container's C(io.gpulab.notebook.image) label).
    type: dict
    default: {}
  backup_store_dir:
    description: Role backup's store on the server.
    type: path
    default: /var/backups/gpulab
  backup_unit:
    description: The systemd unit of the backup timer, whose journal records failed backups.
    type: str
    default: gpulab-backup.service
  timeout:
    description: Seconds to wait for the engine and for each notebook's Jupyter.
    type: int
    default: 5
extends_documentation_fragment:
  - gpulab.lab.attributes
  - gpulab.lab.attributes.idempotent
  - gpulab.lab.attributes.read_only
notes:
  - Needs root to read the Jupyter configs (mode 0400, owned by each student) and the backup store (root only).
seealso:
  - module: gpulab.lab.gpu_facts
"""

EXAMPLES = r"""
---
- name: Read who holds GPU memory
  gpulab.lab.gpu_facts:
    processes: true
  register: gpu

- name: Read the server's status
  gpulab.lab.lab_status:
    gpu: "{{ gpu.gpu }}"
    configured_images:
      student1: ufoym/deepo:all-jupyter-py38-cu113
  register: server

- name: Show each notebook's idle time
  ansible.builtin.debug:
    msg: "{{ item.user }}: idle {{ item.idle_seconds }} s, {{ item.gpu_memory_mib }} MiB of GPU memory"
  loop: "{{ server.status.notebooks }}"
"""

RETURN = r"""
---
status:
  description: The server's status.
  returned: always
  type: dict
  contains:
    collected_at:
      description: When the module read the server (UTC, ISO 8601), by the server's clock.
      type: str
      sample: "2026-12-01T08:00:00Z"
    engine:
      description:
        - The Docker engine. V(answered=false) with V(error) when its socket does not answer.
        - Keys V(answered), V(error), V(version), V(api_version), V(running), V(storage_driver), V(data_root),
          V(data_root_free_bytes), V(data_root_total_bytes), V(containers_running).
      type: dict
    gpu:
      description:
        - V(present), V(driver_version), V(cuda_version), V(error) (gpu_facts' message), and V(gpus), one per GPU with
          V(index), V(uuid), V(name), V(memory_used_mib), V(memory_total_mib), V(utilization_pct) and V(holders), the
          processes holding memory on it (V(pid), V(used_memory_mib), V(container), V(user); V(user) is the student
          whose notebook container the process runs in, V(null) for a process outside gpulab's notebooks).
      type: dict
    notebooks:
      description:
        - One per notebook container gpulab manages (label C(io.gpulab.notebook)), by student name.
        - Keys V(user), V(container), V(state), V(running), V(port), V(bind_address), V(image), V(image_id),
          V(configured_image), V(image_update_pending), V(image_update_reason), V(gpus) (V(all), a list of indices or
          UUIDs, or V([])), V(memory_bytes), V(memory_limit_bytes), V(gpu_memory_mib), V(gpu_pids), V(jupyter)
          (V(answered), V(error), V(started), V(last_activity), V(kernels), V(busy_kernels), V(connections)),
          V(last_activity), V(idle_seconds) (V(0) while a kernel is busy, V(null) when unknown) and
          V(idle_gpu_memory_mib) (GPU memory held while idle).
      type: list
      elements: dict
    backups:
      description:
        - Role backup's store. V(present=false) when the store does not exist.
        - Keys V(store), V(present), V(error), V(store_bytes), V(store_free_bytes), V(store_total_bytes), and
          V(containers), one per container with backups or a recorded failure, with V(container), V(user), V(count),
          V(last_success), V(last_success_id), V(last_success_age_seconds), V(last_success_bytes) (what that backup's
          blobs take in the store), V(complete) (every blob of the last backup present with its size),
          V(last_failure), V(last_failure_reason), V(failed_since_last_success).
      type: dict
"""

# Ansible modules keep their imports below DOCUMENTATION, EXAMPLES and RETURN.
import calendar
import http.client
import json
import os
import posixpath
import re
import shutil
import subprocess
import time
from urllib.parse import quote

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.gpulab.lab.plugins.module_utils.docker_api import DockerApiError, Engine
from ansible_collections.gpulab.lab.plugins.module_utils.notebook.desired import (
    LABEL_IMAGE,
    LABEL_RESTORED,
    LABEL_ROLE,
    LABEL_USER,
)

# Role notebook's labels and file names (plugins/filter/notebook_plan.py, notebook_jupyter.py).
CONTAINER_PORT = "8888/tcp"
JUPYTER_CONFIG_FILE = "gpulab_jupyter_config.json"
# Where each Jupyter flavour's config keeps the token (notebook6, jupyter_server1, jupyter_server2).
TOKEN_KEYS = (("NotebookApp", "token"), ("ServerApp", "token"), ("IdentityProvider", "token"))
# Role backup's store (module_utils/gpulab_backup.py: Store, manifest format).
BACKUP_FORMAT = "gpulab-backup"
_BACKUP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
# The timer's command prints this to its stderr, which the journal keeps, when one container's backup fails.
_FAILURE_RE = re.compile(r"gpulab_backup: backup of (\S+) failed: (.*)$")
_JUPYTER_TIME_RE = re.compile(r"^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.\d+)?(Z|[+-]00:?00)?$")


def utc_seconds(text):
    """Seconds since the epoch of a UTC ISO 8601 time as Jupyter, Docker and gpulab write it; None if not one."""
    match = _JUPYTER_TIME_RE.match(str(text or "").strip())
    if not match:
        return None
    return calendar.timegm(tuple(int(part) for part in match.groups()[:6]))


def iso_utc(seconds):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def disk_space(path):
    """(free bytes, total bytes) of the file system holding path, or its nearest existing parent."""
    while path and not os.path.exists(path):
        path = os.path.dirname(path.rstrip("/")) or "/"
    try:
        usage = shutil.disk_usage(path or "/")
    except OSError:
        return None, None
    return usage.free, usage.total


# ---- the engine and the notebooks -----------------------------------------------------------------------------------


def read_engine(engine):
    """The engine's facts; raises DockerApiError when it does not answer."""
    version = engine.json("GET", "/version")
    info = engine.json("GET", "/info")
    free, total = disk_space(info.get("DockerRootDir") or "/var/lib/docker")
    return {
        "answered": True,
        "error": None,
        "running": True,
        "version": version.get("Version"),
        "api_version": version.get("ApiVersion"),
        "storage_driver": info.get("Driver"),
        "data_root": info.get("DockerRootDir"),
        "data_root_free_bytes": free,
        "data_root_total_bytes": total,
        "containers_running": info.get("ContainersRunning"),
    }


def requested_gpus(host_config):
    """What the container asked for: "all", a list of GPU indices or UUIDs, or [] (the notebook role's
    device_requests, as `docker run --gpus`)."""
    for request in host_config.get("DeviceRequests") or []:
        capabilities = [cap for group in request.get("Capabilities") or [] for cap in group]
        if "gpu" not in capabilities and request.get("Driver") != "nvidia":
            continue
        if request.get("DeviceIDs"):
            return list(request["DeviceIDs"])
        if request.get("Count") == -1:
            return "all"
        if request.get("Count"):
            return [str(i) for i in range(request["Count"])]
    return []


def published_port(inspect):
    """(host port, bind address) of the notebook's Jupyter port, or (None, None): where the engine published it (a
    running container), else what the container asks for."""
    for ports in (
        (inspect.get("NetworkSettings") or {}).get("Ports") or {},
        (inspect.get("HostConfig") or {}).get("PortBindings") or {},
    ):
        for binding in ports.get(CONTAINER_PORT) or []:
            if str(binding.get("HostPort") or "").isdigit():
                return int(binding["HostPort"]), binding.get("HostIp") or "0.0.0.0"  # noqa: S104 - Docker's default
    return None, None


def memory_in_use(stats):
    """Bytes in use as `docker stats` counts them (the page cache that can be dropped left out), or None."""
    memory = (stats or {}).get("memory_stats") or {}
    usage = memory.get("usage")
    if usage is None:
        return None
    details = memory.get("stats") or {}
    cache = details.get("inactive_file", details.get("total_inactive_file", 0))
    return max(usage - cache, 0)


def _stat_value(path, key):
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                name, _space, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        return None
    return 0


def _read_int(path):
    try:
        with open(path, encoding="utf-8") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def cgroup_memory(pid, cgroup_root="/sys/fs/cgroup", proc="/proc"):
    """Bytes in use by the cgroup of a container's main process, page cache that can be dropped left out, read
    from the cgroup files (v1 memory controller, else v2), for engines whose stats API reports no memory."""
    try:
        with open(os.path.join(proc, str(int(pid)), "cgroup"), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, ValueError):
        return None
    for line in lines:
        _hierarchy, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            folder = os.path.join(cgroup_root, "memory", path.lstrip("/"))
            usage = _read_int(os.path.join(folder, "memory.usage_in_bytes"))
            cache = _stat_value(os.path.join(folder, "memory.stat"), "total_inactive_file")
            return None if usage is None else max(usage - (cache or 0), 0)
    for line in lines:
        _hierarchy, controllers, path = line.split(":", 2)
        if not controllers:
            folder = os.path.join(cgroup_root, path.lstrip("/"))
            usage = _read_int(os.path.join(folder, "memory.current"))
            cache = _stat_value(os.path.join(folder, "memory.stat"), "inactive_file")
            return None if usage is None else max(usage - (cache or 0), 0)
    return None


def image_update(configured, container_image, container_image_id, restored, configured_id):
    """(pending, reason) of a notebook's image against the image the lab configures."""
    if not configured:
        return False, None
    if configured != container_image:
        if restored:
            return True, f"restored from a backup; the lab now configures {configured}"
        return True, f"the lab configures {configured}, the container runs {container_image}"
    if configured_id is None:
        return False, None
    if not restored and configured_id != container_image_id:
        return True, f"{configured} on the server is a newer image than the container's"
    return False, None


def jupyter_token(config_dir, user):
    """The token in the student's Jupyter config (role notebook's file), or "" (a password-only notebook)."""
    path = posixpath.join(config_dir, user, JUPYTER_CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    for section, key in TOKEN_KEYS:
        token = (config.get(section) or {}).get(key)
        if token:
            return str(token)
    return ""


def _get_json(host, port, path, token, timeout):
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Authorization": f"token {token}", "Accept": "application/json"})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise OSError(f"GET {path.split('?')[0]} answered {response.status}")
    return json.loads(body)


def ask_jupyter(host, port, token, timeout):
    """Jupyter's status and kernels; never raises. no_track_activity keeps the question from counting as activity
    (the status handler never counts; the kernels handler would)."""
    found = {
        "answered": False,
        "error": None,
        "started": None,
        "last_activity": None,
        "kernels": None,
        "busy_kernels": None,
        "connections": None,
    }
    if token is None:
        found["error"] = "no Jupyter config of role notebook for this student"
        return found
    if not token:
        found["error"] = "password login only (no token): Jupyter's status needs a login"
        return found
    try:
        status = _get_json(host, port, "/api/status", token, timeout)
        kernels = _get_json(host, port, "/api/kernels?no_track_activity=1", token, timeout)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        found["error"] = f"Jupyter on {host}:{port} did not answer: {exc}"
        return found
    found.update(
        answered=True,
        started=status.get("started"),
        last_activity=status.get("last_activity"),
        kernels=status.get("kernels"),
        connections=status.get("connections"),
        busy_kernels=sum(1 for kernel in kernels or [] if kernel.get("execution_state") == "busy"),
    )
    return found


def idle_seconds(jupyter, now):
    """Seconds since Jupyter's last activity; 0 while a kernel is busy (a long training run is not idle)."""
    if not jupyter["answered"]:
        return None
    if jupyter["busy_kernels"]:
        return 0
    last = utc_seconds(jupyter["last_activity"])
    return None if last is None else max(int(now - last), 0)


def read_notebook(engine, summary, params, gpu_by_container, now):
    inspect = engine.json("GET", f"/containers/{quote(summary['Id'], safe='')}/json")
    labels = inspect["Config"].get("Labels") or {}
    host_config = inspect.get("HostConfig") or {}
    user = labels.get(LABEL_USER) or inspect["Name"].lstrip("/")
    running = bool(inspect["State"].get("Running"))
    port, bind = published_port(inspect)
    restored = bool(labels.get(LABEL_RESTORED))
    configured = params["configured_images"].get(user) or labels.get(LABEL_IMAGE)
    configured_image = engine.image(configured) if configured else None
    pending, reason = image_update(
        configured,
        labels.get(LABEL_IMAGE) if restored else inspect["Config"].get("Image"),
        inspect.get("Image"),
        restored,
        configured_image["Id"] if configured_image else None,
    )
    memory = None
    if running:
        status, data = engine.request("GET", f"/containers/{inspect['Id']}/stats?stream=false&one-shot=true")
        memory = memory_in_use(json.loads(data)) if status == 200 else None
        if memory is None:
            memory = cgroup_memory(inspect["State"].get("Pid") or 0)
    held = gpu_by_container.get(inspect["Id"], [])
    if running and port:
        host = "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind  # noqa: S104 - a wildcard bind is asked locally
        jupyter = ask_jupyter(host, port, jupyter_token(params["notebook_config_dir"], user), params["timeout"])
    else:
        jupyter = ask_jupyter(None, None, None, 0)
        jupyter["error"] = "the notebook is not running" if not running else "the notebook publishes no port"
    idle = idle_seconds(jupyter, now)
    gpu_memory = sum(process["used_memory_mib"] or 0 for process in held)
    return {
        "user": user,
        "container": inspect["Name"].lstrip("/"),
        "state": inspect["State"].get("Status"),
        "running": running,
        "port": port,
        "bind_address": bind,
        "image": inspect["Config"].get("Image"),
        "image_id": inspect.get("Image"),
        "configured_image": configured,
        "image_update_pending": pending,
        "image_update_reason": reason,
        "gpus": requested_gpus(host_config),
        "memory_bytes": memory,
        "memory_limit_bytes": host_config.get("Memory") or None,
        "gpu_memory_mib": gpu_memory,
        "gpu_pids": sorted(process["pid"] for process in held),
        "jupyter": jupyter,
        "last_activity": jupyter["last_activity"],
        "idle_seconds": idle,
        "idle_gpu_memory_mib": gpu_memory if idle else 0,
    }


def read_notebooks(engine, params, gpu_by_container, now):
    containers = engine.json("GET", "/containers/json?all=1&filters=" + quote(json.dumps({"label": [LABEL_ROLE]})))
    notebooks = [read_notebook(engine, summary, params, gpu_by_container, now) for summary in containers]
    return sorted(notebooks, key=lambda notebook: notebook["user"])


# ---- the GPUs -------------------------------------------------------------------------------------------------------


def container_names(engine):
    """{full container ID: (name, student or None)} of every container on the engine."""
    names = {}
    for summary in engine.json("GET", "/containers/json?all=1"):
        name = (summary.get("Names") or ["/?"])[0].lstrip("/")
        names[summary["Id"]] = (name, (summary.get("Labels") or {}).get(LABEL_USER))
    return names


def read_gpus(gpu, gpu_error, names):
    """The GPUs with the processes holding memory on each, and those processes by container ID."""
    by_container = {}
    gpus = []
    holders = {}
    for process in gpu.get("processes") or []:
        name, user = names.get(process.get("container_id"), (None, None))
        holder = {
            "pid": process["pid"],
            "used_memory_mib": process.get("used_memory_mib"),
            "container": name if process.get("container_id") else None,
            "user": user,
        }
        holders.setdefault(process.get("gpu_uuid"), []).append(holder)
        if process.get("container_id"):
            by_container.setdefault(process["container_id"], []).append(process)
    for entry in gpu.get("gpus") or []:
        gpus.append(
            {
                "index": entry.get("index"),
                "uuid": entry.get("uuid"),
                "name": entry.get("name"),
                "memory_used_mib": entry.get("memory_used_mib"),
                "memory_total_mib": entry.get("memory_total_mib"),
                "utilization_pct": entry.get("utilization_pct"),
                "holders": holders.get(entry.get("uuid"), []),
            }
        )
    found = {
        "present": bool(gpu.get("present")),
        "error": gpu_error or None,
        "driver_version": gpu.get("driver_version"),
        "cuda_version": gpu.get("cuda_version"),
        "gpus": gpus,
    }
    return found, by_container


# ---- the backups ----------------------------------------------------------------------------------------------------


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _stored_bytes(manifest):
    """What a backup's blobs take in the store (each blob once), as module_utils/gpulab_backup.py lists them."""
    blobs = {}
    for layer in manifest.get("layers") or []:
        for blob in layer.get("blobs") or []:
            blobs[blob.get("digest")] = blob
    for mount in manifest.get("mounts") or []:
        for blob in mount.get("blobs") or []:
            blobs[blob.get("digest")] = blob
    return blobs


def _complete(store, blobs):
    for digest, blob in blobs.items():
        if not isinstance(digest, str) or not digest.startswith("sha256:"):
            return False
        try:
            if os.stat(os.path.join(store, "blobs", "sha256", digest[len("sha256:") :])).st_size != blob.get(
                "stored_size"
            ):
                return False
        except OSError:
            return False
    return True


def _created(manifest):
    """(creation time in seconds, id): the order of a container's backups, as the store orders them."""
    created = manifest.get("created")
    if not isinstance(created, (int, float)):
        created = utc_seconds(manifest.get("created_utc")) or 0
    return created, str(manifest.get("id"))


def read_manifests(store):
    """{container: [manifest, ...] oldest first} of the store's complete manifests."""
    backups = {}
    folder = os.path.join(store, "backups")
    for container in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not _BACKUP_NAME_RE.match(container) or not os.path.isdir(os.path.join(folder, container)):
            continue
        manifests = []
        for name in os.listdir(os.path.join(folder, container)):
            manifest = _read_json(os.path.join(folder, container, name)) if name.endswith(".json") else None
            if isinstance(manifest, dict) and manifest.get("format") == BACKUP_FORMAT and manifest.get("id"):
                manifests.append(manifest)
        manifests.sort(key=_created)
        backups[container] = manifests
    return backups


def parse_failures(journal):
    """{container: (seconds, reason)} of the last failure per container in `journalctl -o short-unix` text."""
    failures = {}
    for line in journal.splitlines():
        match = _FAILURE_RE.search(line)
        stamp = line.split(" ", 1)[0]
        if match and re.match(r"^\d+(\.\d+)?$", stamp):
            failures[match.group(1)] = (float(stamp), match.group(2).strip())
    return failures


def _store_bytes(store):
    total = 0
    for folder, _dirs, files in os.walk(store):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except OSError:
                continue
    return total


def read_backups(store, failures, users, now):
    """The store's backups per container; users: {container name: student} of the notebooks."""
    free, total = disk_space(store)
    found = {
        "store": store,
        "present": os.path.isdir(store),
        "error": None,
        "store_bytes": None,
        "store_free_bytes": free,
        "store_total_bytes": total,
        "containers": [],
    }
    if not found["present"]:
        found["error"] = f"the backup store {store} does not exist: no backup was made on this server"
    manifests = read_manifests(store) if found["present"] else {}
    if found["present"]:
        found["store_bytes"] = _store_bytes(store)
    for container in sorted(set(manifests) | set(failures) | set(users)):
        kept = manifests.get(container) or []
        last = kept[-1] if kept else {}
        blobs = _stored_bytes(last) if last else {}
        created = _created(last)[0] if last else None
        failed_at, reason = failures.get(container, (None, None))
        since = failed_at is not None and (created is None or failed_at > created)
        found["containers"].append(
            {
                "container": container,
                "user": users.get(container) or ((last.get("run_settings") or {}).get("labels") or {}).get(LABEL_USER),
                "count": len(kept),
                "last_success": last.get("created_utc"),
                "last_success_id": last.get("id"),
                "last_success_age_seconds": None if created is None else max(int(now - created), 0),
                "last_success_bytes": sum(blob.get("stored_size") or 0 for blob in blobs.values()) if last else None,
                "complete": _complete(store, blobs) if last else None,
                "last_failure": None if failed_at is None else iso_utc(failed_at),
                "last_failure_reason": reason,
                "failed_since_last_success": since,
            }
        )
    return found


def read_journal(module, unit):
    """The backup unit's journal (short-unix: seconds first), or "" where there is no journal."""
    journalctl = module.get_bin_path("journalctl")
    if not journalctl:
        return ""
    try:
        result = subprocess.run(
            [journalctl, "--unit", unit, "--output", "short-unix", "--no-pager", "--quiet", "--lines", "5000"],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout if result.returncode == 0 else ""


# ---- the module -----------------------------------------------------------------------------------------------------


def collect(module, params, now):
    engine = Engine(params["docker_host"], timeout=params["timeout"])
    status = {"collected_at": iso_utc(now), "notebooks": []}
    try:
        status["engine"] = read_engine(engine)
        names = container_names(engine)
    except DockerApiError as exc:
        status["engine"] = {"answered": False, "running": False, "error": str(exc)}
        names = {}
    status["gpu"], by_container = read_gpus(params["gpu"], params["gpu_error"], names)
    if status["engine"]["answered"]:
        try:
            status["notebooks"] = read_notebooks(engine, params, by_container, now)
        except DockerApiError as exc:
            status["engine"]["error"] = f"reading the notebooks failed: {exc}"
    users = {notebook["container"]: notebook["user"] for notebook in status["notebooks"]}
    failures = parse_failures(read_journal(module, params["backup_unit"]))
    status["backups"] = read_backups(params["backup_store_dir"], failures, users, now)
    return status


def main():
    module = AnsibleModule(
        argument_spec={
            "docker_host": {"type": "str", "default": "unix:///var/run/docker.sock"},
            "gpu": {"type": "dict", "default": {}},
            "gpu_error": {"type": "str", "default": ""},
            "notebook_config_dir": {"type": "path", "default": "/etc/gpulab/notebook"},
            "configured_images": {"type": "dict", "default": {}},
            "backup_store_dir": {"type": "path", "default": "/var/backups/gpulab"},
            "backup_unit": {"type": "str", "default": "gpulab-backup.service"},
            "timeout": {"type": "int", "default": 5},
        },
        supports_check_mode=True,
    )
    if module.params["timeout"] <= 0:
        module.fail_json(msg=f"timeout must be a positive number of seconds, not {module.params['timeout']}")
    try:
        status = collect(module, module.params, time.time())
    except DockerApiError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(changed=False, status=status)


if __name__ == "__main__":
    main()
