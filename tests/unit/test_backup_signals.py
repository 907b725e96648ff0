"""Stopping a backup is safe (issue 14): the backup package's command line, run as role backup's timer runs it (a
copy of the installed files, the role's settings file, the unit's own commands rendered from the role's vars), on
this machine's real Docker engine, stopped while it holds a container paused:

  - SIGTERM or SIGINT (`systemctl stop`, KillMode=mixed: the signal reaches the backup alone): the container runs again
    within seconds, no partial file is left in the store's tmp/, the message says what happened, exit 128 + signal;
  - SIGKILL (no cleanup): the unit's ExecStopPost command (cli thaw) thaws the container and removes the partial files.
"""

import json
import os
import signal
import subprocess
import time
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
    wait_for,
)

pytestmark = [needs_docker]


@pytest.fixture
def busy(tiny, tmp_path):
    """A running container backed up once, then with 120 MB of random bytes new in its writable layer (seconds of
    reading, paused, on the fast path: the changes since the last backup are read while it is paused), its store and
    the timer's settings file naming it."""
    name = f"gpulab-unittest-stop-{uuid.uuid4().hex[:8]}"
    run_container(name, tiny)
    store = tmp_path / "store"
    settings = timer_settings(tmp_path / "backup-timer.json", store, [name], include_workdir=False)
    env, python = timer_lib(tmp_path)
    argv = unit_command("__backup_command", settings, python, backup_containers=[name])
    subprocess.run(argv, env=env, capture_output=True, check=True)
    sh("docker", "exec", name, "sh", "-c", "head -c 120000000 /dev/urandom > /root/big.bin")
    backups = sorted(os.listdir(store / "backups" / name))
    yield {"name": name, "store": store, "settings": settings, "env": env, "python": python, "backups": backups}
    if (inspect(name) or {}).get("State", {}).get("Paused"):
        subprocess.run(["docker", "unpause", name], capture_output=True, check=False)
    remove_container(name)
    remove_images_of(name)


def start_timer_run(busy):
    """The unit's ExecStart, started; returns the process once it holds the container paused (its marker written)."""
    argv = unit_command("__backup_command", busy["settings"], busy["python"], backup_containers=[busy["name"]])
    proc = subprocess.Popen(
        argv, env=busy["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    container_id = inspect(busy["name"])["Id"]
    marker = busy["store"] / "tmp" / f"paused-{container_id}"

    def holds_it_paused():
        return marker.exists() and inspect(busy["name"])["State"]["Paused"]

    if not wait_for(holds_it_paused, timeout=120, interval=0.05):
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the backup never held the container paused: {out} {err}")
    return proc


def running_again(name, within):
    started = time.monotonic()
    ok = wait_for(lambda: not inspect(name)["State"]["Paused"], timeout=within, interval=0.05)
    return ok, round(time.monotonic() - started, 2)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_backup_thaws_the_container_and_removes_its_partial_files(busy, signum):
    proc = start_timer_run(busy)
    proc.send_signal(signum)  # the backup alone, as systemd's KillMode=mixed sends it
    ok, seconds = running_again(busy["name"], within=5)
    out, err = proc.communicate(timeout=60)
    print(f"{signum.name}: running again {seconds} s after the signal; exit {proc.returncode}; stderr: {err}")
    assert ok, f"still paused 5 s after {signum.name}"
    assert proc.returncode == 128 + signum
    assert f"backup of {busy['name']} failed: stopped ({signum.name}); what it paused was thawed" in err
    assert f"1 of 1 container(s) not backed up: {busy['name']}" in err
    assert "Traceback" not in err and out == ""
    assert os.listdir(busy["store"] / "tmp") == []  # no blob, chunk, manifest or marker left
    assert sorted(os.listdir(busy["store"] / "backups" / busy["name"])) == busy["backups"]  # none more
    # No zstd of the backup is left behind either.
    assert sh("pgrep", "-s", str(proc.pid), check=False) == ""


def test_the_units_exec_stop_post_thaws_after_a_sigkill(busy):
    proc = start_timer_run(busy)
    tmp = busy["store"] / "tmp"
    # Killed once it has partial files too (the chunks of the writable layer it reads while paused).
    assert wait_for(lambda: any(not n.startswith("paused-") for n in os.listdir(tmp)), timeout=60, interval=0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # what systemd does once TimeoutStopSec has passed: no cleanup at all
    proc.communicate(timeout=30)
    assert inspect(busy["name"])["State"]["Paused"] is True
    left = sorted(os.listdir(busy["store"] / "tmp"))
    assert any(n.startswith("paused-") for n in left) and any(not n.startswith("paused-") for n in left), left
    thaw = unit_command("__backup_thaw_command", busy["settings"], busy["python"])
    started = time.monotonic()
    done = subprocess.run(thaw, env=busy["env"], capture_output=True, text=True, check=False, timeout=60)
    seconds = round(time.monotonic() - started, 2)
    print(f"ExecStopPost after SIGKILL: {seconds} s; left before it: {left}; its output: {done.stdout}")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["thawed"] == [busy["name"]]
    assert sorted(result["removed"]) == [n for n in left if not n.startswith("paused-")]
    assert inspect(busy["name"])["State"]["Paused"] is False
    assert seconds < 5
    assert os.listdir(busy["store"] / "tmp") == []
    # Run again (the unit's ExecStopPost also runs after a good run): nothing to do.
    again = subprocess.run(thaw, env=busy["env"], capture_output=True, text=True, check=True)
    assert json.loads(again.stdout)["thawed"] == []
