"""Role status's report (molecule.yml says what the server is), checked against the server itself.

The JSON (status_output_dir/status.json) must hold, for the server: the engine as `docker` reports it, the stand-in
H200 with the kernel's real PID mapped to student1's container, each notebook's port, state, image, pending image
update, GPUs, memory and Jupyter's own last activity, and the backups as the backup package's command line lists them,
with the timer's failed run from its journal. A run in check mode with a server that does not answer names it and
changes nothing. The HTML page is rendered by headless Chromium: a screenshot (status-page.png in the scenario's
ephemeral folder, and a copy where GPULAB_STATUS_SCREENSHOT says) and the text Chromium laid out (printed to PDF,
read back with pdftotext).
"""

import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared" / "tests"))
from playbook_run import run_playbook

EPHEMERAL = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"])
REPORT = EPHEMERAL / "status"
UUID = "GPU-00000000-1111-2222-3333-444444444444"
HIGHLIGHT = (0xFF, 0xD6, 0xD6)  # tr.alert's background in plugins/filter/status.py


@pytest.fixture(scope="module")
def report():
    return json.loads((REPORT / "status.json").read_text())


@pytest.fixture(scope="module")
def server(report, host):
    [found] = [s for s in report["servers"] if s["host"] == host.backend.get_hostname()]
    return found


@pytest.fixture(scope="module")
def notebooks(server):
    return {notebook["user"]: notebook for notebook in server["notebooks"]}


@pytest.fixture(scope="module")
def kernel_pid(host):
    return int(host.file("/run/gpulab-nvidia-smi/processes.csv").content_string.split(",")[0])


@pytest.fixture(scope="module")
def secrets(host):
    users = {u["name"]: u for u in host.ansible.get_variables()["notebook_users"]}
    return [users["student1"]["token"], users["student2"]["password"]]


def test_engine_as_docker_reports_it(host, server):
    engine = server["engine"]
    assert engine["answered"] is True
    assert engine["running"] is True
    assert engine["version"] == host.check_output("docker version --format '{{.Server.Version}}'")
    assert engine["storage_driver"] == host.check_output("docker info --format '{{.Driver}}'") == "overlay2"
    assert engine["data_root"] == "/var/lib/docker"
    free, total = (int(n) for n in host.check_output("df -B1 --output=avail,size /var/lib/docker | tail -1").split())
    # the host's disk is shared with other work: its free space moves between converge and this test
    assert abs(engine["data_root_free_bytes"] - free) < 0.02 * total
    assert engine["data_root_total_bytes"] == total
    assert server["alerts"]  # the idle notebook and student2's backup, below


def test_gpu_memory_is_held_by_student1s_kernel(server, kernel_pid):
    gpu = server["gpu"]
    assert (gpu["present"], gpu["driver_version"], gpu["cuda_version"], gpu["error"]) == (
        True,
        "580.159.04",
        "13.0",
        None,
    )
    [h200] = gpu["gpus"]
    assert (h200["index"], h200["uuid"], h200["name"]) == (0, UUID, "NVIDIA H200")
    assert (h200["memory_used_mib"], h200["memory_total_mib"], h200["utilization_pct"]) == (1034, 143771, 0)
    assert h200["holders"] == [
        {"pid": kernel_pid, "used_memory_mib": 1034, "container": "notebook-student1", "user": "student1"}
    ]


def test_student1s_notebook(host, notebooks, kernel_pid, secrets):
    nb = notebooks["student1"]
    inspect = json.loads(host.check_output("docker inspect notebook-student1"))[0]
    assert (nb["container"], nb["port"], nb["bind_address"], nb["state"], nb["running"]) == (
        "notebook-student1",
        7777,
        "127.0.0.1",
        "running",
        True,
    )
    assert (nb["image"], nb["image_id"]) == ("gpulab-test/dl-notebook:latest", inspect["Image"])
    assert (nb["configured_image"], nb["image_update_pending"], nb["image_update_reason"]) == (
        "gpulab-test/dl-notebook:latest",
        False,
        None,
    )
    assert nb["gpus"] == ["0"]
    assert nb["memory_limit_bytes"] == 2 * 1024**3
    assert 10 * 1024**2 < nb["memory_bytes"] < 2 * 1024**3
    assert (nb["gpu_memory_mib"], nb["gpu_pids"]) == (1034, [kernel_pid])
    # Jupyter's own answer, asked here the same way (the status handler does not count as activity)
    ask = (
        "import json, sys, urllib.request; r = urllib.request.Request('http://127.0.0.1:7777/api/status', "
        "headers={'Authorization': 'token ' + sys.stdin.read().strip()}); "
        "print(urllib.request.urlopen(r, timeout=10).read().decode())"
    )
    status = json.loads(host.check_output(f"echo {shlex.quote(secrets[0])} | python3 -c {shlex.quote(ask)}"))
    jupyter = nb["jupyter"]
    assert jupyter["answered"] is True, jupyter
    assert (jupyter["started"], jupyter["last_activity"]) == (status["started"], status["last_activity"])
    assert (jupyter["kernels"], jupyter["busy_kernels"], jupyter["connections"]) == (1, 0, 0)
    assert nb["last_activity"] == status["last_activity"]
    assert 0 < nb["idle_seconds"] < 3600
    assert nb["idle_gpu_memory_mib"] == 1034
    assert nb["idle_alert"] is True  # status_idle_hours: 0


def test_student2s_notebook(notebooks):
    nb = notebooks["student2"]
    assert (nb["port"], nb["state"], nb["gpus"], nb["gpu_memory_mib"], nb["gpu_pids"]) == (7778, "running", [], 0, [])
    assert nb["image_update_pending"] is True
    assert "gpulab-test/dl-notebook:2027.01" in nb["image_update_reason"]
    assert nb["memory_limit_bytes"] is None
    assert nb["memory_bytes"] > 10 * 1024**2
    assert nb["jupyter"]["answered"] is False
    assert "password" in nb["jupyter"]["error"]
    assert (nb["idle_seconds"], nb["idle_alert"]) == (None, False)


# The command line of the backup package, as the timer's unit runs it (its ExecStart up to the subcommand).
TIMER_CLI = """
set -eu
command="$(systemctl show -P ExecStart gpulab-backup.service | sed -n 's/.*argv\\[\\]=\\(.*\\) backup .*/\\1/p')"
cd "$(systemctl show -P WorkingDirectory gpulab-backup.service | grep . || echo /)"
env $(systemctl show -P Environment gpulab-backup.service) $command "$@"
"""


def test_backups_as_the_store_lists_them(host, server):
    backups = server["backups"]
    assert (backups["store"], backups["present"], backups["error"]) == ("/var/backups/gpulab", True, None)
    listing = json.loads(host.check_output(f"bash -c {shlex.quote(TIMER_CLI)} cli list --store /var/backups/gpulab"))
    assert backups["store_bytes"] == listing["store_bytes"]
    df = host.check_output("df -B1 --output=avail,size /var/backups/gpulab | tail -1")
    free, total = (int(n) for n in df.split())
    assert backups["store_total_bytes"] == total
    assert abs(backups["store_free_bytes"] - free) < 0.02 * total
    entries = {entry["container"]: entry for entry in backups["containers"]}
    assert set(entries) == {"notebook-student1", "notebook-student2"}
    [listed] = listing["backups"]
    first = entries["notebook-student1"]
    assert (first["user"], first["count"], first["complete"]) == ("student1", 1, True)
    assert (first["last_success_id"], first["last_success"]) == (listed["backup_id"], listed["created"])
    assert first["last_success_bytes"] == listed["stored_bytes"] > 0
    assert 0 <= first["last_success_age_seconds"] < 3600
    assert first["age_alert"] is False
    # the timer's run that could not reach the engine, after the backup
    assert first["last_failure"].endswith("Z")
    assert first["last_failure"] > first["last_success"]
    assert "does not answer" in first["last_failure_reason"]
    assert (first["failed_since_last_success"], first["failure_alert"]) == (True, True)
    second = entries["notebook-student2"]
    assert (second["user"], second["count"], second["last_success"], second["last_success_bytes"]) == (
        "student2",
        0,
        None,
        None,
    )
    assert (second["age_alert"], second["last_failure"], second["failure_alert"]) == (True, None, False)


def test_alerts_name_who_is_over_the_thresholds(report, server):
    kinds = {(alert["kind"], alert["who"]) for alert in report["alerts"]}
    assert kinds == {("idle-gpu", "student1"), ("backup-failed", "student1"), ("backup-age", "student2")}
    assert report["unanswered"] == []
    assert report["thresholds"]["backup_max_age_seconds"] == 2 * 86400


def test_no_secret_in_the_report(secrets):
    for path in (REPORT / "status.json", REPORT / "status.html"):
        text = path.read_text()
        assert not [secret for secret in secrets if secret in text], path


def test_check_mode_with_a_server_that_does_not_answer(host, tmp_path, secrets):
    """status.yml in check mode: the same report, the server unchanged, the lost server named with the reason."""
    hostname = host.backend.get_hostname()
    inventory = tmp_path / "gone.json"
    inventory.write_text(
        json.dumps(
            {
                "gpu_servers": {
                    "hosts": {
                        "gpulab-status-gone": {
                            "ansible_connection": "community.docker.docker",
                            "ansible_host": "gpulab-status-no-such-instance",
                        }
                    }
                }
            }
        )
    )
    run = run_playbook(
        hostname, "gpulab.lab.status", {"status_output_dir": str(tmp_path / "out")}, "--check", inventories=[inventory]
    )
    assert run.rc == 0, run.raw[-3000:]
    assert (run.changed, run.failed, run.unreachable) == (0, 0, 0)
    assert "NOT ANSWERING: gpulab-status-gone" in run
    assert not [secret for secret in secrets if secret in run.raw]
    checked = json.loads((tmp_path / "out" / "status.json").read_text())
    [gone] = checked["unanswered"]
    assert gone["host"] == "gpulab-status-gone"
    assert "gpulab-status-no-such-instance" in gone["reason"]
    [again] = [s for s in checked["servers"] if s["host"] == hostname]
    assert [nb["user"] for nb in again["notebooks"]] == ["student1", "student2"]
    assert again["gpu"]["gpus"][0]["holders"][0]["user"] == "student1"


def png_pixels(path):
    """(width, height, rows of RGB tuples) of an 8-bit RGB or RGBA PNG such as Chromium writes."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert (depth, colour in (2, 6), interlace) == (8, True, 0)
    channels = 4 if colour == 6 else 3
    raw, stride, rows, previous = zlib.decompress(idat), width * channels, [], bytearray(width * channels)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b = previous[i]
            c = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append([tuple(line[x * channels : x * channels + 3]) for x in range(width)])
        previous = line
    return width, height, rows


def chromium(*args):
    program = shutil.which("chromium") or shutil.which("chromium-browser")
    assert program, "headless Chromium is missing (prepare.yml installs Debian's chromium)"
    command = [program, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    subprocess.run(command, check=True, capture_output=True, timeout=120)


def test_the_page_as_chromium_renders_it(tmp_path):
    page = (REPORT / "status.html").resolve()
    html = page.read_text()
    assert "<script" not in html
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")  # nothing fetched from anywhere
    assert html.count("<svg") == 3
    shot = EPHEMERAL / "status-page.png"
    chromium("--window-size=1400,1800", f"--screenshot={shot}", page.as_uri())
    if os.environ.get("GPULAB_STATUS_SCREENSHOT"):  # where to keep a copy (docs/status-page.png is one)
        shutil.copyfile(shot, os.environ["GPULAB_STATUS_SCREENSHOT"])
    pdf = tmp_path / "status.pdf"
    chromium("--no-pdf-header-footer", f"--print-to-pdf={pdf}", page.as_uri())
    text = " ".join(
        subprocess.run(
            ["pdftotext", "-layout", str(pdf), "-"], check=True, capture_output=True, text=True
        ).stdout.split()
    )
    for words in (
        "gpulab: the lab at a glance",
        "student1",
        "student2",
        "IDLE, HOLDING GPU MEMORY",
        "GPU memory per student",
        "Idle time",
        "Age of the last backup",
        "student2: never backed up",
        "student1 (PID",
        "NVIDIA H200",
        "1034 MiB",
    ):
        assert words in text, words
    width, height, rows = png_pixels(shot)
    assert (width, height) == (1400, 1800)
    highlighted = sum(1 for row in rows for pixel in row if pixel == HIGHLIGHT)
    assert highlighted > 2000  # the idle row and student2's backup row, painted
    red_bars = sum(1 for row in rows for pixel in row if pixel == (0xD3, 0x2F, 0x2F))
    assert red_bars > 100  # the charts' bars over a threshold
