#!/usr/bin/env python3
"""Benchmark (a script, not a timed test): how site.yml's second run (nothing to change, changed=0) grows with the
number of students on one server and with the number of servers.

Rows: 1, 10 and 30 students on one server, then 1, 2 and 4 servers with 5 students each. Each row first converges
(site.yml, untimed), then times a second run of site.yml and checks that it changed nothing. The servers are
Docker-in-Docker containers like scripts/demo's (Debian 12 with systemd and its own engine, Debian's docker.io,
reached with docker exec); the notebooks run a small Jupyter image, gpulab-test/small-notebook (the local Debian
base and Debian's python3-notebook only, built here once), loaded by role deepo from a docker save archive, as the
demo loads its image.

Target: the second run with 30 students takes at most TARGET_RATIO times the second run with 1 student. When it is
missed (or with --profile) the 30 students' second run is repeated with ansible.posix.profile_tasks and the tasks are
listed by their total time over all students (a student's name in a task's name is folded into STUDENT), so the
per-student cost is named. Exits non-zero when the target is missed or a second run changed something.

It touches nothing of the engine's but what it creates: containers and volumes gpulab-bench-fleet-*, the image
gpulab-test/small-notebook, all labelled io.gpulab.harness=1; the servers are removed at the end unless --keep
(scripts/clean removes them too). Its files are in .cache/bench-fleet.
Each row's figure is the fastest of --repeat second runs (default 2): on a shared machine another job slows some runs.
Usage: tests/bench/bench_fleet.py [--keep] [--profile] [--repeat N] [--rows all|students|fleet]
(as root, with the venv active, from anywhere).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / ".cache" / "bench-fleet"
LABEL = "io.gpulab.harness=1"
BASE_IMAGE = os.environ.get("GPULAB_BASE_IMAGE_PREFIX", "gpulab-test/debian") + ":12"
IMAGE = "gpulab-test/small-notebook:latest"
SERVER_PREFIX = "gpulab-bench-fleet-"
STUDENT_ROWS = (1, 10, 30)
SERVER_ROWS = (1, 2, 4)
STUDENTS_PER_SERVER = 5
TARGET_RATIO = 2.0
# The throwaway servers' notebooks share one token (published on 127.0.0.1 inside the servers only).
TOKEN = "0123456789abcdef0123456789abcdef0123456789abcdef"  # noqa: S105

DOCKERFILE = """\
ARG BASE
FROM ${BASE}
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-notebook \\
    && rm -rf /var/lib/apt/lists/*
"""
# The flags every Docker-in-Docker server of the project runs with (test-machines.md: no --privileged here).
CAPABILITIES = (
    "SYS_ADMIN NET_ADMIN SYS_PTRACE SYS_MODULE MKNOD NET_RAW SYS_CHROOT AUDIT_WRITE SETFCAP DAC_READ_SEARCH IPC_LOCK"
    " SYS_NICE"
)
SERVER_FLAGS = [
    "--cgroupns=host",
    *(f"--cap-add={cap}" for cap in CAPABILITIES.split()),
    "--security-opt=seccomp=unconfined",
    "--security-opt=apparmor=unconfined",
    "-v",
    "/sys/fs/cgroup:/sys/fs/cgroup:rw",
    "--tmpfs=/run",
    "--tmpfs=/run/lock",
]


class Row(NamedTuple):
    servers: int
    students: int  # per server
    seconds: float  # wall time of site.yml's second run
    tasks: int  # tasks Ansible ran on the first server (ok + changed + skipped)


def sh(*argv: str, **kw) -> str:
    return subprocess.run(list(argv), check=True, text=True, capture_output=True, **kw).stdout


def log(msg: str) -> None:
    print(f"[bench_fleet] {msg}", file=sys.stderr, flush=True)


def build_image() -> Path:
    """The small Jupyter image and its docker save archive (built once, reused while the image is there)."""
    archive = WORK / "small-notebook.tar.zst"
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True, check=False).returncode != 0:
        log(f"building {IMAGE} (Debian's python3-notebook on {BASE_IMAGE})")
        context = WORK / "image"
        context.mkdir(parents=True, exist_ok=True)
        (context / "Dockerfile").write_text(DOCKERFILE)
        sh("docker", "build", "-q", "--label", LABEL, "--build-arg", f"BASE={BASE_IMAGE}", "-t", IMAGE, str(context))
        archive.unlink(missing_ok=True)
    if not archive.exists():
        log(f"saving {IMAGE} to {archive}")
        part = archive.with_suffix(".part")
        with subprocess.Popen(["docker", "save", IMAGE], stdout=subprocess.PIPE) as save:
            sh("zstd", "-q", "-T0", "-3", "-o", str(part), stdin=save.stdout)
        if save.returncode != 0:
            sys.exit(f"docker save {IMAGE} failed")
        part.rename(archive)
    return archive


def start_server(name: str) -> None:
    subprocess.run(["docker", "rm", "-f", "-v", name], capture_output=True, check=False)
    subprocess.run(["docker", "volume", "rm", f"{name}-docker"], capture_output=True, check=False)
    sh("docker", "volume", "create", "--label", LABEL, f"{name}-docker")
    sh(
        "docker", "run", "-d", "--name", name, "--hostname", name, "--label", LABEL, *SERVER_FLAGS,
        "-v", f"{name}-docker:/var/lib/docker", BASE_IMAGE, "/lib/systemd/systemd",
    )  # fmt: skip


def prepare_server(name: str, students: int) -> None:
    for _ in range(60):
        state = subprocess.run(
            ["docker", "exec", name, "systemctl", "is-system-running"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if state in ("running", "degraded"):
            break
        time.sleep(1)
    accounts = " ".join(f"student{i}" for i in range(1, students + 1))
    sh("docker", "exec", name, "bash", "-c", f"for u in {accounts}; do id $u >/dev/null 2>&1 || useradd -m $u; done")


def remove_servers(names: list[str]) -> None:
    for name in names:
        subprocess.run(["docker", "rm", "-f", "-v", name], capture_output=True, check=False)
        subprocess.run(["docker", "volume", "rm", f"{name}-docker"], capture_output=True, check=False)


def write_inventory(servers: list[str], students: int, archive: Path, absent: range = range(0)) -> Path:
    """An inventory of the servers, each with `students` notebooks (and the students of `absent` removed)."""
    users = [
        {"name": f"student{i}", "port": 9000 + i, "workdir": f"/srv/notebooks/student{i}", "token": TOKEN}
        for i in range(1, students + 1)
    ] + [{"name": f"student{i}", "state": "absent"} for i in absent]
    group_vars = {
        "docker_install_source": "distro",
        "docker_verify_image": "",
        "deepo_image_source": "archive",
        "deepo_image_repository": IMAGE.split(":", maxsplit=1)[0],
        "deepo_image_tag": "latest",
        "deepo_image_archive": str(archive),
        "notebook_access_dir": str(WORK / "access"),
        "notebook_users": users,
    }
    inventory = {
        "all": {
            "children": {
                "gpu_servers": {
                    "hosts": {
                        s: {"ansible_connection": "community.docker.docker", "ansible_become": False} for s in servers
                    },
                    "vars": group_vars,
                }
            }
        }
    }
    path = WORK / "hosts.json"  # JSON is YAML: Ansible's yaml inventory plugin reads it
    path.write_text(json.dumps(inventory, indent=1))
    return path


RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)\s+skipped=(\d+)", re.M)


def site(inventory: Path, extra_env: dict[str, str] | None = None) -> tuple[float, str, dict[str, tuple[int, ...]]]:
    env = {**os.environ, "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1", **(extra_env or {})}
    started = time.monotonic()
    proc = subprocess.run(
        ["ansible-playbook", "-i", str(inventory), "site.yml"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        sys.exit(f"site.yml failed (rc {proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}")
    recap = {m[0]: tuple(int(x) for x in m[1:]) for m in RECAP.findall(proc.stdout)}
    return seconds, proc.stdout, recap


def measure(servers: list[str], students: int, archive: Path, repeat: int) -> Row:
    """Converge, then the fastest of `repeat` second runs (the machine's other work slows some runs down)."""
    inventory = write_inventory(servers, students, archive)
    site(inventory)  # converge: the new students' notebooks start
    times = []
    for _ in range(repeat):
        seconds, _, recap = site(inventory)
        changed = {host: counts[1] for host, counts in recap.items() if counts[1]}
        if changed:
            sys.exit(f"site.yml's second run changed something: {changed}")
        times.append(seconds)
    seconds = min(times)
    ok, _, _, _, skipped = recap[servers[0]]
    row = Row(len(servers), students, seconds, ok + skipped)
    runs = ", ".join(f"{t:.1f}" for t in times)
    log(f"{row.servers} server(s) x {row.students} student(s): second runs {runs} s, {row.tasks} tasks")
    return row


PROFILE_LINE = re.compile(r"^(.+?) -{3,} (\d+\.\d+)s$", re.M)


def profile(servers: list[str], students: int, archive: Path) -> list[tuple[str, int, float]]:
    """The second run's tasks with ansible.posix.profile_tasks: (task, runs, seconds in all), costliest first."""
    inventory = write_inventory(servers, students, archive)
    _, out, _ = site(
        inventory,
        {
            "ANSIBLE_CALLBACKS_ENABLED": "ansible.posix.profile_tasks",
            "PROFILE_TASKS_TASK_OUTPUT_LIMIT": "all",
        },
    )
    summary = out.split("=" * 20)[-1]  # the callback's table follows a line of '='
    totals: dict[str, list[float]] = collections.defaultdict(list)
    for name, secs in PROFILE_LINE.findall(summary):
        totals[re.sub(r"student\d+", "STUDENT", name.strip())].append(float(secs))
    return sorted(((n, len(v), sum(v)) for n, v in totals.items()), key=lambda t: -t[2])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the servers at the end")
    parser.add_argument("--profile", action="store_true", help="profile the 30 students' run even on target")
    parser.add_argument("--repeat", type=int, default=2, help="second runs per row; the fastest counts (default 2)")
    parser.add_argument("--rows", choices=["all", "students", "fleet"], default="all", help="which rows to run")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    archive = build_image()
    servers = 1 if args.rows == "students" else max(SERVER_ROWS)
    names = [f"{SERVER_PREFIX}{i}" for i in range(1, servers + 1)]
    for name in names:
        start_server(name)
    for name in names:
        prepare_server(name, max(STUDENT_ROWS))
    rows: list[Row] = []
    fleet: list[Row] = []
    costs: list[tuple[str, int, float]] = []
    ratio = None
    try:
        first = names[:1]
        if args.rows != "fleet":
            rows = [measure(first, students, archive, args.repeat) for students in STUDENT_ROWS]
            by_students = {r.students: r.seconds for r in rows}
            ratio = by_students[max(STUDENT_ROWS)] / by_students[min(STUDENT_ROWS)]
            if args.profile or ratio > TARGET_RATIO:
                costs = profile(first, max(STUDENT_ROWS), archive)
        if args.rows != "students":
            # The fleet rows start from 5 students on the first server: the others' notebooks are removed (untimed).
            removed = range(STUDENTS_PER_SERVER + 1, max(STUDENT_ROWS) + 1)
            site(write_inventory(first, STUDENTS_PER_SERVER, archive, removed))
            fleet = [measure(names[:n], STUDENTS_PER_SERVER, archive, args.repeat) for n in SERVER_ROWS]
    finally:
        if not args.keep:
            remove_servers(names)

    print("\nsite.yml's second run (changed=0), wall time")
    print(f"{'servers':>8} {'students/server':>16} {'seconds':>8} {'tasks/server':>13}")
    for r in rows + fleet:
        print(f"{r.servers:>8} {r.students:>16} {r.seconds:>8.1f} {r.tasks:>13}")
    if ratio is None:
        return 0
    verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
    print(f"\n30 students / 1 student: {ratio:.2f} x (target at most {TARGET_RATIO} x): {verdict}")
    if costs:
        print("\nsecond run with 30 students, tasks by total time (profile_tasks; STUDENT: one run per student)")
        print(f"{'seconds':>8} {'runs':>5}  task")
        for name, runs, secs in costs[:25]:
            print(f"{secs:>8.2f} {runs:>5}  {name}")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
