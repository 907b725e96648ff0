"""Tests of how role deepo waits for a long pull or load (roles/deepo/tasks/wait.yml, action gpulab.lab.async_progress):
a real async job of a few minutes on this machine, reporting its progress at a 1 s interval, waited for by the role's
own tasks through ansible-playbook. The controller's memory (ansible-playbook and its workers) and the number of tasks
the play runs must stay flat however long the job runs, where an include that includes itself would add tasks and
memory every round.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The job's length: 150 s (about 150 rounds) keeps the test under 3 minutes; GPULAB_PROGRESS_TEST_SECONDS changes it.
SECONDS = int(os.environ.get("GPULAB_PROGRESS_TEST_SECONDS", "150"))
MIB = 1048576

# A pull's stand-in: writes a progress file as docker_image_pull_progress does (atomically, once a second), then ends.
JOB = textwrap.dedent(
    """
    import json, os, sys, time
    path, seconds = sys.argv[1], int(sys.argv[2])
    start = time.time()
    for done in range(seconds):
        progress = {"phase": "downloading", "layers_done": done, "layers_total": seconds,
                    "bytes_done": done * 1048576, "bytes_total": seconds * 1048576, "seconds": time.time() - start}
        with open(path + ".tmp", "w") as f:
            json.dump(progress, f)
        os.replace(path + ".tmp", path)
        time.sleep(1)
    print(json.dumps({"layers": seconds}))
    """
)


def playbook(tmp_path, argv, seconds):
    """A play that starts argv as an async job and waits for it with role deepo's wait.yml at a 1 s interval."""
    tasks = [
        {
            "name": "Note when the job starts",
            "ansible.builtin.set_fact": {"__deepo_job_started": "{{ now().timestamp() }}"},
        },
        {
            "name": "Start the job",
            "ansible.builtin.command": {"argv": argv},
            "async": seconds + 300,
            "poll": 0,
            "register": "__deepo_job",
            "changed_when": False,
        },
        {
            "name": "Wait for it as role deepo does",
            "ansible.builtin.include_role": {"name": "gpulab.lab.deepo", "tasks_from": "wait.yml"},
            "vars": {
                "__deepo_what": "Pulling gpulab-test/progress:1",
                "__deepo_progress_file": str(tmp_path / "job.progress"),
                "deepo_progress_interval": 1,
                "deepo_load_timeout": seconds + 300,
            },
        },
        {"name": "Show the job's result", "ansible.builtin.debug": {"msg": "job stdout {{ __deepo_wait.stdout }}"}},
    ]
    path = tmp_path / "wait.yml"
    path.write_text(json.dumps([{"hosts": "localhost", "gather_facts": False, "tasks": tasks}]))
    return path


def ansible_playbook(path):
    command = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", "-c", "local", str(path)]
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_PYTHON_INTERPRETER=sys.executable)
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def controller_rss(pid):
    """Resident memory, in bytes, of ansible-playbook and its workers (its forks, with its command line); not the
    short-lived module processes that each round starts."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
            if b"ansible-playbook" not in Path(f"/proc/{current}/cmdline").read_bytes():
                continue
            status = Path(f"/proc/{current}/status").read_text()
            total += int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024
        except (OSError, AttributeError):
            continue
    return total


@pytest.fixture(scope="module")
def waited(tmp_path_factory):
    """ansible-playbook waiting for the job; (return code, output, [(seconds since start, the controller's RSS)])."""
    tmp_path = tmp_path_factory.mktemp("progress")
    job = tmp_path / "job.py"
    job.write_text(JOB)
    proc = ansible_playbook(
        playbook(tmp_path, [sys.executable, str(job), str(tmp_path / "job.progress"), str(SECONDS)], SECONDS)
    )
    output = []
    reader = threading.Thread(target=lambda: output.append(proc.stdout.read().decode(errors="replace")))
    reader.start()
    samples, start = [], time.monotonic()
    while proc.poll() is None:
        samples.append((time.monotonic() - start, controller_rss(proc.pid)))
        time.sleep(1)
    reader.join()
    return proc.returncode, output[0], samples


def test_the_wait_reports_progress_every_interval(waited):
    rc, output, _ = waited
    assert rc == 0, output[-3000:]
    lines = re.findall(r"Pulling gpulab-test/progress:1: (\w+, layers .*? s elapsed)", " ".join(output.split()))
    print(f"{len(lines)} progress lines for a {SECONDS} s job; the last: {lines[-1] if lines else None}")
    assert len(lines) >= 0.5 * SECONDS, output[-3000:]  # a line a second where a round takes less (2 cores, loaded)
    assert re.fullmatch(r"downloading, layers \d+ of \d+, \d+ of \d+ MiB, \d+ s elapsed", lines[-1]), lines[-1]
    assert f'job stdout {{"layers": {SECONDS}}}' in output  # the job's own result is the task's


def test_the_play_runs_the_same_tasks_however_long_the_job_runs(waited):
    _, output, _ = waited
    tasks = re.findall(r"^TASK \[(.*?)\]", output, re.MULTILINE)
    print(f"{len(tasks)} tasks run")
    assert len(tasks) <= 6, tasks[:20]  # start, the include, the wait, the failure check, the result: not per round


def test_the_controllers_memory_stays_flat(waited):
    """The controller's resident memory in the job's last fifth against its second fifth (after start-up)."""
    samples = waited[2]
    duration = samples[-1][0]
    early = [rss for at, rss in samples if 0.2 * duration <= at < 0.4 * duration]
    late = [rss for at, rss in samples if at >= 0.8 * duration]
    growth = max(late) - statistics.median(early)
    print(f"controller memory: {statistics.median(early) / MIB:.1f} MiB early, {max(late) / MIB:.1f} MiB at most late")
    assert growth < 8 * MIB, f"grew by {growth / MIB:.1f} MiB"


def test_a_failed_job_stops_the_play_with_its_reason(tmp_path):
    argv = [sys.executable, "-c", "import sys; print('no space left on device', file=sys.stderr); sys.exit(3)"]
    proc = ansible_playbook(playbook(tmp_path, argv, 5))
    output = " ".join(proc.communicate(timeout=120)[0].decode(errors="replace").split())
    assert proc.returncode != 0, output[-3000:]
    assert "Pulling gpulab-test/progress:1 failed: non-zero return code Nothing was loaded." in output, output[-3000:]
    assert "job stdout" not in output
