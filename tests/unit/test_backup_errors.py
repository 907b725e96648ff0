"""Errors that say what to do (issue 14), on this machine's real Docker engine: the store on a small tmpfs mounted
for the test, filled up to the last page after a first backup, so that the timer's next run (the backup package's
command line with the role's settings file, two containers) finds the disk full at the manifest step: one line per
container naming the path and the space free and needed, no traceback, the second container still attempted, exit 1
with the containers not backed up, and the store consistent (list, a restore of the earlier backup). Also the
notebooks the timer finds when it runs (issue 13): a container labelled as a notebook after the settings were written.
"""

import contextlib
import json
import os
import subprocess
import uuid

import pytest
from backup_harness import (
    inspect,
    needs_docker,
    remove_container,
    remove_images_of,
    run_container,
    sh,
    timer_lib,
    timer_settings,
    tiny_fixture,  # noqa: F401 (the fixture tiny)
    unit_command,
)

pytestmark = [needs_docker]


@pytest.fixture
def two(tiny):
    names = [f"gpulab-unittest-full-{i}-{uuid.uuid4().hex[:6]}" for i in ("a", "b")]
    for name in names:
        run_container(name, tiny)
        sh("docker", "exec", name, "sh", "-c", f"echo {name} > /root/mine.txt")
    yield names
    for name in names:
        remove_container(name)
        remove_images_of(name)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs of its own (the machine is root), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", disk], check=False)
    if mounted.returncode != 0:
        pytest.skip("a tmpfs cannot be mounted here (not root?)")
    yield disk
    subprocess.run(["umount", "-l", disk], check=False)


def fill(disk):
    """Write a file until the disk refuses a single byte more."""
    with open(disk / "filler", "wb", buffering=0) as f:
        for block in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * block)
    return os.statvfs(disk).f_bavail


def run_cli(env, python, *args):
    argv = [python, "-m", "ansible_collections.gpulab.lab.plugins.module_utils.backup.cli", *map(str, args)]
    return subprocess.run(argv, env=env, capture_output=True, text=True, check=False, timeout=300)


def test_a_full_disk_at_the_manifest_step_is_told_and_the_run_goes_on(two, small_disk, tmp_path):
    first, second = two
    store = small_disk / "store"
    env, python = timer_lib(tmp_path)
    settings = timer_settings(tmp_path / "backup-timer.json", store, two, include_workdir=False)
    timer = unit_command("__backup_command", settings, python, backup_containers=two)
    earlier = subprocess.run(timer, env=env, capture_output=True, text=True, check=False)
    assert earlier.returncode == 0, earlier.stderr
    earlier_ids = {r["container"]: r["backup_id"] for r in map(json.loads, earlier.stdout.splitlines())}
    # Nothing changed in the containers: the next run writes no blob, only its manifests; the disk is full for them.
    free = fill(small_disk)
    full = subprocess.run(timer, env=env, capture_output=True, text=True, check=False)
    print(f"free blocks after filling: {free}; exit {full.returncode}; stderr:\n{full.stderr}")
    assert full.returncode == 1
    assert full.stdout == ""
    lines = full.stderr.splitlines()
    assert "Traceback" not in full.stderr
    for name in two:  # both attempted, each told on its own line, with the manifest's path and the space
        (line,) = [line for line in lines if line.startswith(f"gpulab_backup: backup of {name} failed: ")]
        assert f"the manifest {store}/backups/{name}/" in line, line
        assert "No space left on device" in line
        assert "0 bytes free on that disk; free at least" in line
        assert f"this backup of {name} is not kept, the backups before it are intact" in line
    assert lines[-1] == f"gpulab_backup: 2 of 2 container(s) not backed up: {first}, {second}"

    # The store is consistent: only the earlier backups listed, complete; nothing in tmp/; a restore works.
    os.unlink(small_disk / "filler")
    assert os.listdir(store / "tmp") == []
    listing = json.loads(run_cli(env, python, "list", "--store", store).stdout)
    assert {b["container"]: b["backup_id"] for b in listing["backups"]} == earlier_ids
    assert all(b["complete"] for b in listing["backups"])
    checked = run_cli(env, python, "restore", "--store", store, "--container", first, "--verify-only")
    assert json.loads(checked.stdout)["verified"] == "full", checked.stderr
    restored = run_cli(env, python, "restore", "--store", store, "--container", second, "--force")
    assert restored.returncode == 0, restored.stderr
    assert sh("docker", "exec", second, "cat", "/root/mine.txt") == second
    # And the next run, with space again, backs both up.
    again = subprocess.run(timer, env=env, capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr
    assert sorted(json.loads(line)["container"] for line in again.stdout.splitlines()) == sorted(two)


def test_an_error_of_one_container_does_not_stop_the_others(two, tmp_path):
    env, python = timer_lib(tmp_path)
    store = tmp_path / "store"
    missing = f"gpulab-unittest-gone-{uuid.uuid4().hex[:6]}"
    settings = timer_settings(tmp_path / "backup-timer.json", store, [missing, *two], include_workdir=False)
    run = subprocess.run(
        unit_command("__backup_command", settings, python, backup_containers=[missing, *two]),
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 1
    assert sorted(json.loads(line)["container"] for line in run.stdout.splitlines()) == sorted(two)
    assert f"backup of {missing} failed: no container named {missing}" in run.stderr
    assert run.stderr.splitlines()[-1] == f"gpulab_backup: 1 of 3 container(s) not backed up: {missing}"


def test_the_timer_backs_up_a_notebook_created_after_its_settings_were_written(tiny, tmp_path):
    """backup_containers empty: the role writes no container list, and the unit's command asks the engine for the
    notebook containers (role notebook's labels) when it runs."""
    env, python = timer_lib(tmp_path)
    store = tmp_path / "store"
    settings = timer_settings(tmp_path / "backup-timer.json", store, include_workdir=False)
    assert "container" not in json.loads(settings.read_text())
    timer = unit_command("__backup_command", settings, python)
    assert timer[-1] == "--notebooks"
    name = f"gpulab-unittest-notebook-{uuid.uuid4().hex[:6]}"
    labels = ["--label", "io.gpulab.notebook=1", "--label", f"io.gpulab.notebook.user={name}"]
    other = f"gpulab-unittest-other-{uuid.uuid4().hex[:6]}"
    try:
        run_container(name, tiny, *labels)  # after the settings file
        run_container(other, tiny)  # not a notebook
        run = subprocess.run(timer, env=env, capture_output=True, text=True, check=False)
        print(run.stdout[-2000:], run.stderr[-2000:])
        assert "Traceback" not in run.stderr
        results = {r["container"]: r for r in map(json.loads, run.stdout.splitlines())}
        assert name in results and other not in results
        assert results[name]["layers_new"] >= 1
        listing = json.loads(run_cli(env, python, "list", "--store", store, "--container", name).stdout)
        assert [b["backup_id"] for b in listing["backups"]] == [results[name]["backup_id"]]
        assert inspect(name)["State"]["Running"] is True
    finally:
        for container in (name, other):
            remove_container(container)
            remove_images_of(container)
