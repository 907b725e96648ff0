# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""What the GPUs are doing right now: memory used, utilization, and which processes (and containers) hold memory.

Owns the two nvidia-smi CSV queries gpulab asks for usage (QUERY_GPU_ARGS, QUERY_APPS_ARGS), their parsing, and
the mapping of a host PID to the container it runs in through /proc/<pid>/cgroup. It does not talk to Docker: a
container ID is all it gives; module lab_status names the student from the container's labels. Pure functions over
text, so unit tests feed them real nvidia-smi output (tests/fixtures/nvidia-smi/); standard library only.
"""

from __future__ import annotations

import dataclasses
import os
import re

# The columns are those of the real capture tests/fixtures/nvidia-smi/h200/query-gpu.csv, so the test stand-in
# replays that file as it is.
QUERY_GPU_FIELDS = (
    "index",
    "uuid",
    "name",
    "driver_version",
    "memory.total",
    "memory.used",
    "utilization.gpu",
    "pci.bus_id",
    "compute_cap",
)
QUERY_GPU_ARGS = ["--query-gpu=" + ",".join(QUERY_GPU_FIELDS), "--format=csv,noheader,nounits"]
QUERY_APPS_ARGS = ["--query-compute-apps=pid,used_memory,gpu_uuid", "--format=csv,noheader,nounits"]

# A container's ID in a cgroup path: systemd's cgroup driver names the scope docker-<id>.scope (cgroup v1 and v2),
# the cgroupfs driver makes /docker/<id>. Docker-in-Docker nests them; the last one is the innermost container.
_CONTAINER_ID_RE = re.compile(r"(?:docker-|/docker/)([0-9a-f]{64})(?:\.scope)?(?=/|$)")


@dataclasses.dataclass(frozen=True)
class GpuUsage:
    """One GPU as --query-gpu reports it; None where nvidia-smi says N/A."""

    index: int
    uuid: str
    name: str | None
    memory_total_mib: int | None
    memory_used_mib: int | None
    utilization_pct: int | None


@dataclasses.dataclass(frozen=True)
class ComputeProcess:
    """One process holding GPU memory. pid is as the host (the nvidia-smi caller's PID namespace) sees it."""

    pid: int
    used_memory_mib: int | None
    gpu_uuid: str
    gpu_index: int | None
    container_id: str | None


def _number(value):
    value = value.strip()
    return int(value) if value.isdigit() else None


def parse_gpu_usage(text):
    """GpuUsage per line of `nvidia-smi` with QUERY_GPU_ARGS; lines that do not fit (errors, headers) are skipped."""
    usage = []
    for line in text.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != len(QUERY_GPU_FIELDS) or not fields[0].isdigit():
            continue
        row = dict(zip(QUERY_GPU_FIELDS, fields))
        usage.append(
            GpuUsage(
                index=int(row["index"]),
                uuid=row["uuid"],
                name=row["name"] or None,
                memory_total_mib=_number(row["memory.total"]),
                memory_used_mib=_number(row["memory.used"]),
                utilization_pct=_number(row["utilization.gpu"]),
            )
        )
    return usage


def parse_compute_apps(text):
    """(pid, used MiB or None, gpu uuid) per line of `nvidia-smi` with QUERY_APPS_ARGS.

    No process prints nothing (recent drivers) or a line that is not CSV (older ones); both give [].
    """
    apps = []
    for line in text.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 3 or not fields[0].isdigit() or not fields[2].startswith(("GPU-", "MIG-")):
            continue
        apps.append((int(fields[0]), _number(fields[1]), fields[2]))
    return apps


def container_id_from_cgroup(text):
    """The ID of the innermost Docker container in /proc/<pid>/cgroup's text, or None (a process on the host)."""
    found = None
    for line in text.splitlines():
        # hierarchy-ID:controllers:path; v2 has one line 0::path, v1 one per hierarchy (all name the same container)
        path = line.split(":", 2)[-1]
        ids = _CONTAINER_ID_RE.findall(path)
        if ids:
            found = ids[-1]
    return found


def container_id_of_pid(pid, proc="/proc"):
    """The Docker container ID of a host PID, or None (no container, or the process ended)."""
    try:
        with open(os.path.join(proc, str(int(pid)), "cgroup"), encoding="utf-8", errors="replace") as f:
            return container_id_from_cgroup(f.read())
    except OSError:
        return None


def processes(apps, usage, proc="/proc"):
    """ComputeProcess per parse_compute_apps entry, with the GPU's index and the PID's container."""
    index_of = {gpu.uuid: gpu.index for gpu in usage}
    return [
        ComputeProcess(
            pid=pid,
            used_memory_mib=used,
            gpu_uuid=uuid,
            gpu_index=index_of.get(uuid),
            container_id=container_id_of_pid(pid, proc),
        )
        for pid, used, uuid in apps
    ]


def as_dicts(records):
    return [dataclasses.asdict(record) for record in records]
