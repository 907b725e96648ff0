"""Tests of plugins/modules/lab_status.py: the notebooks' engine facts, Jupyter asked with the token in a header, the
backup store read from its files, the journal's failures; the module against this machine's real Docker engine with a
container labelled as a notebook (gpulab-test/debian:12, the harness's base image)."""

import http.server
import json
import secrets
import subprocess
import threading
import time
import typing

import pytest
import yaml
from ansible.module_utils.testing import patch_module_args
from module_harness import ModuleExit

from ansible_collections.gpulab.lab.plugins.modules import lab_status

BASE_IMAGE = "gpulab-test/debian:12"


# --- Jupyter ---------------------------------------------------------------------------------------------------------


class FakeJupyter(http.server.BaseHTTPRequestHandler):
    """A stand-in Jupyter on 127.0.0.1 answering /api/status and /api/kernels as Notebook 6 does; it records what it
    was asked and refuses a request without the token."""

    token = ""
    asked: typing.ClassVar[list] = []
    kernels: typing.ClassVar[list] = []

    def do_GET(self):
        self.asked.append((self.path, self.headers.get("Authorization")))
        if self.headers.get("Authorization") != f"token {self.token}":
            self.send_response(403)
            self.end_headers()
            return
        if self.path == "/api/status":
            body = {
                "started": "2026-12-01T06:00:00.000000Z",
                "last_activity": "2026-12-01T07:00:00.123456Z",
                "connections": 1,
                "kernels": len(self.kernels),
            }
        elif self.path == "/api/kernels?no_track_activity=1":
            body = self.kernels
        else:
            self.send_response(404)
            self.end_headers()
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def jupyter():
    FakeJupyter.token = secrets.token_hex(16)
    FakeJupyter.asked = []
    FakeJupyter.kernels = [{"id": "k1", "execution_state": "idle"}]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeJupyter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


def test_jupyter_is_asked_with_the_token_in_a_header_and_without_counting_as_activity(jupyter):
    found = lab_status.ask_jupyter("127.0.0.1", jupyter, FakeJupyter.token, 5)
    assert found == {
        "answered": True,
        "error": None,
        "started": "2026-12-01T06:00:00.000000Z",
        "last_activity": "2026-12-01T07:00:00.123456Z",
        "kernels": 1,
        "busy_kernels": 0,
        "connections": 1,
    }
    assert [path for path, _ in FakeJupyter.asked] == ["/api/status", "/api/kernels?no_track_activity=1"]
    assert all(FakeJupyter.token not in path for path, _ in FakeJupyter.asked)
    now = lab_status.utc_seconds("2026-12-01T09:30:00Z")
    assert lab_status.idle_seconds(found, now) == 2.5 * 3600


def test_a_busy_kernel_is_not_idle(jupyter):
    FakeJupyter.kernels = [{"id": "k1", "execution_state": "idle"}, {"id": "k2", "execution_state": "busy"}]
    found = lab_status.ask_jupyter("127.0.0.1", jupyter, FakeJupyter.token, 5)
    assert found["busy_kernels"] == 1
    assert lab_status.idle_seconds(found, time.time()) == 0


def test_a_wrong_token_or_no_token_is_reported(jupyter):
    wrong = lab_status.ask_jupyter("127.0.0.1", jupyter, "not-the-token-at-all", 5)
    assert wrong["answered"] is False
    assert "answered 403" in wrong["error"]
    assert "password" in lab_status.ask_jupyter("127.0.0.1", jupyter, "", 5)["error"]
    assert "no Jupyter config" in lab_status.ask_jupyter("127.0.0.1", jupyter, None, 5)["error"]
    assert lab_status.idle_seconds(wrong, time.time()) is None


@pytest.mark.parametrize(
    "config",
    [
        {"NotebookApp": {"token": "t0ken-notebook6-xxxx", "password": ""}},
        {"ServerApp": {"token": "t0ken-notebook6-xxxx"}},
        {"IdentityProvider": {"token": "t0ken-notebook6-xxxx"}, "PasswordIdentityProvider": {}},
    ],
    ids=["notebook6", "jupyter_server1", "jupyter_server2"],
)
def test_token_from_role_notebooks_config(tmp_path, config):
    (tmp_path / "ana").mkdir()
    (tmp_path / "ana" / "gpulab_jupyter_config.json").write_text(json.dumps(config))
    assert lab_status.jupyter_token(str(tmp_path), "ana") == "t0ken-notebook6-xxxx"
    assert lab_status.jupyter_token(str(tmp_path), "bo") is None


def test_password_only_config_has_no_token(tmp_path):
    (tmp_path / "ana").mkdir()
    (tmp_path / "ana" / "gpulab_jupyter_config.json").write_text('{"NotebookApp": {"token": "", "password": "x"}}')
    assert lab_status.jupyter_token(str(tmp_path), "ana") == ""


# --- the containers' facts -------------------------------------------------------------------------------------------


def test_requested_gpus_as_role_notebook_asks_for_them():
    gpu = [["gpu"]]
    assert lab_status.requested_gpus({"DeviceRequests": [{"Count": -1, "Capabilities": gpu}]}) == "all"
    assert lab_status.requested_gpus({"DeviceRequests": [{"DeviceIDs": ["0", "2"], "Capabilities": gpu}]}) == [
        "0",
        "2",
    ]
    assert lab_status.requested_gpus({"DeviceRequests": None}) == []
    assert lab_status.requested_gpus({"DeviceRequests": [{"Driver": "other", "Count": 1}]}) == []


def test_memory_in_use_leaves_out_the_page_cache():
    v2 = {"memory_stats": {"usage": 900, "stats": {"inactive_file": 300}}}
    v1 = {"memory_stats": {"usage": 900, "stats": {"total_inactive_file": 100}}}
    assert (lab_status.memory_in_use(v2), lab_status.memory_in_use(v1), lab_status.memory_in_use({})) == (
        600,
        800,
        None,
    )


def test_image_update():
    assert lab_status.image_update("lab/dl:2", "lab/dl:1", "sha256:a", False, "sha256:b") == (
        True,
        "the lab configures lab/dl:2, the container runs lab/dl:1",
    )
    assert lab_status.image_update("lab/dl:1", "lab/dl:1", "sha256:a", False, "sha256:b") == (
        True,
        "lab/dl:1 on the server is a newer image than the container's",
    )
    assert lab_status.image_update("lab/dl:1", "lab/dl:1", "sha256:a", False, "sha256:a") == (False, None)
    # a restored notebook runs its backup's image; the lab's image recorded on it is what counts
    assert lab_status.image_update("lab/dl:1", "lab/dl:1", "sha256:backup", True, "sha256:a") == (False, None)
    assert lab_status.image_update("lab/dl:2", "lab/dl:1", "sha256:backup", True, None)[0] is True
    assert lab_status.image_update(None, "lab/dl:1", "sha256:a", False, None) == (False, None)


# --- the backup store and the journal ---------------------------------------------------------------------------------


def write_backup(store, container, backup_id, created, blob_sizes, *, missing=()):
    blobs = []
    for i, size in enumerate(blob_sizes):
        digest = "sha256:" + f"{backup_id}{i}".encode().hex().ljust(64, "0")[:64]
        blobs.append({"digest": digest, "stored_size": size, "size": size * 3})
        path = store / "blobs" / "sha256" / digest[7:]
        path.parent.mkdir(parents=True, exist_ok=True)
        if i not in missing:
            path.write_bytes(b"z" * size)
    manifest = {
        "format": "gpulab-backup",
        "version": 1,
        "id": backup_id,
        "container": container,
        "created": created,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
        "layers": [{"diff_id": "sha256:" + "1" * 64, "size": 1, "blobs": blobs[:-1]}],
        "mounts": [{"source": "/srv/x", "blobs": blobs[-1:]}],
        "run_settings": {"labels": {"io.gpulab.notebook.user": container.removeprefix("notebook-")}},
    }
    folder = store / "backups" / container
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{backup_id}.json").write_text(json.dumps(manifest))


def test_backups_read_from_the_stores_files(tmp_path):
    store = tmp_path / "store"
    now = 1_800_000_000
    write_backup(store, "notebook-ana", "20260101T000000Z-a", now - 90000, [1000, 200])
    write_backup(store, "notebook-ana", "20260102T000000Z-b", now - 3600, [1000, 50, 30])
    write_backup(store, "notebook-bo", "20260101T000000Z-c", now - 7200, [500, 10], missing=(0,))
    (store / "backups" / "notebook-ana" / "junk.json").write_text("not json")
    failures = {"notebook-bo": (now - 60, "the Docker engine at /x does not answer"), "notebook-ana": (now - 4000, "x")}
    found = lab_status.read_backups(str(store), failures, {"notebook-cy": "cy"}, now)
    assert found["present"] is True
    assert found["store_bytes"] >= 2790
    assert found["store_free_bytes"] > 0
    by_name = {entry["container"]: entry for entry in found["containers"]}
    assert by_name["notebook-ana"] == {
        "container": "notebook-ana",
        "user": "ana",
        "count": 2,
        "last_success": "2027-01-15T07:00:00Z",
        "last_success_id": "20260102T000000Z-b",
        "last_success_age_seconds": 3600,
        "last_success_bytes": 1080,
        "complete": True,
        "last_failure": "2027-01-15T06:53:20Z",
        "last_failure_reason": "x",
        "failed_since_last_success": False,  # it failed before the last success
    }
    assert (by_name["notebook-bo"]["complete"], by_name["notebook-bo"]["failed_since_last_success"]) == (False, True)
    assert by_name["notebook-cy"]["count"] == 0
    assert by_name["notebook-cy"]["last_success_age_seconds"] is None


def test_no_store_is_said_so(tmp_path):
    found = lab_status.read_backups(str(tmp_path / "none"), {}, {}, time.time())
    assert found["present"] is False
    assert "does not exist" in found["error"]
    assert found["store_free_bytes"] > 0  # of the disk it would be on


def test_failures_from_the_units_journal():
    journal = (
        "1764560000.123456 gpu1 python3[812]: gpulab_backup: backup of notebook-ana failed: the Docker engine at "
        "/run/x.sock does not answer (GET /containers/notebook-ana/json): [Errno 2] No such file or directory\n"
        '1764560001.000000 gpu1 python3[812]: {"container": "notebook-bo", "backup_id": "x"}\n'
        "1764560002.500000 gpu1 systemd[1]: gpulab-backup.service: Main process exited, code=exited, status=1/FAILURE\n"
        "1764570000.000000 gpu1 python3[900]: gpulab_backup: backup of notebook-ana failed: disk full\n"
    )
    assert lab_status.parse_failures(journal) == {"notebook-ana": (1764570000.0, "disk full")}


# --- the module against the real engine -------------------------------------------------------------------------------


def docker(*args):
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def fake_notebook(tmp_path):
    name = f"gpulab-unittest-status-{secrets.token_hex(4)}"
    docker(
        "run", "-d", "--name", name, "--label", "io.gpulab.notebook=1", "--label", "io.gpulab.notebook.user=ana",
        "--label", "io.gpulab.harness=1", "--label", f"io.gpulab.notebook.image={BASE_IMAGE}",
        "-p", "127.0.0.1::8888", "--memory", "256m", BASE_IMAGE, "sleep", "300",
    )  # fmt: skip
    yield name, json.loads(docker("inspect", name))[0]
    docker("rm", "-f", name)


def run_module(args):
    with patch_module_args(args), pytest.raises(ModuleExit) as info:
        lab_status.main()
    return info.value.result


def test_module_reports_a_notebook_container_of_the_real_engine(fake_notebook, tmp_path, capture_exit):
    name, inspect = fake_notebook
    pid = inspect["State"]["Pid"]
    gpu = {
        "present": True,
        "driver_version": "580.159.04",
        "gpus": [{"index": 0, "uuid": "GPU-0", "name": "NVIDIA H200", "memory_used_mib": 800}],
        "processes": [
            {"pid": pid, "used_memory_mib": 700, "gpu_uuid": "GPU-0", "container_id": inspect["Id"]},
            {"pid": 1, "used_memory_mib": 100, "gpu_uuid": "GPU-0", "container_id": None},
        ],
    }
    config_dir = tmp_path / "config"
    (config_dir / "ana").mkdir(parents=True)
    (config_dir / "ana" / "gpulab_jupyter_config.json").write_text('{"NotebookApp": {"token": "abcdefabcdef0123"}}')
    args = {
        "gpu": gpu,
        "notebook_config_dir": str(config_dir),
        "configured_images": {"ana": "gpulab-test/dl-notebook:no-such-tag"},
        "backup_store_dir": str(tmp_path / "store"),
        "timeout": 2,
    }
    result = run_module(args)
    assert result["changed"] is False
    status = result["status"]
    engine = status["engine"]
    assert engine["answered"] is True
    assert engine["version"] == docker("version", "--format", "{{.Server.Version}}")
    assert engine["storage_driver"] == docker("info", "--format", "{{.Driver}}")
    assert engine["data_root_free_bytes"] > 0
    [notebook] = [nb for nb in status["notebooks"] if nb["container"] == name]
    port = int(docker("port", name, "8888").rsplit(":", 1)[1])
    assert (notebook["user"], notebook["state"], notebook["port"], notebook["bind_address"]) == (
        "ana",
        "running",
        port,
        "127.0.0.1",
    )
    assert (notebook["image"], notebook["image_id"], notebook["gpus"]) == (BASE_IMAGE, inspect["Image"], [])
    assert notebook["image_update_pending"] is True
    assert notebook["memory_limit_bytes"] == 256 * 1024**2
    assert 0 < notebook["memory_bytes"] < 256 * 1024**2
    assert (notebook["gpu_memory_mib"], notebook["gpu_pids"]) == (700, [pid])
    assert notebook["jupyter"]["answered"] is False  # nothing listens in the container
    assert "did not answer" in notebook["jupyter"]["error"]
    holders = status["gpu"]["gpus"][0]["holders"]
    assert holders == [
        {"pid": pid, "used_memory_mib": 700, "container": name, "user": "ana"},
        {"pid": 1, "used_memory_mib": 100, "container": None, "user": None},
    ]
    assert status["backups"]["present"] is False
    assert "abcdefabcdef0123" not in json.dumps(result)
    # check mode: the same facts
    checked = run_module({**args, "_ansible_check_mode": True})["status"]
    assert [nb["user"] for nb in checked["notebooks"] if nb["container"] == name] == ["ana"]


def test_module_with_an_engine_that_does_not_answer(tmp_path, capture_exit):
    result = run_module({"docker_host": f"unix://{tmp_path}/none.sock", "backup_store_dir": str(tmp_path)})
    engine = result["status"]["engine"]
    assert (engine["answered"], engine["running"]) == (False, False)
    assert "does not answer" in engine["error"]
    assert result["status"]["notebooks"] == []
    assert result["status"]["backups"]["present"] is True


@pytest.mark.parametrize(
    ("cgroup", "files", "expected"),
    [
        pytest.param(
            "4:memory:/docker/abc\n0::/docker/abc\n",
            {"memory/docker/abc/memory.usage_in_bytes": "9000\n", "memory/docker/abc/memory.stat": "cache 5\n"
             "total_inactive_file 1000\n"},
            8000,
            id="v1",
        ),
        pytest.param(
            "0::/system.slice/docker-abc.scope\n",
            {"system.slice/docker-abc.scope/memory.current": "7000\n",
             "system.slice/docker-abc.scope/memory.stat": "anon 10\ninactive_file 2000\n"},
            5000,
            id="v2",
        ),
        pytest.param("0::/gone\n", {}, None, id="no-files"),
    ],
)  # fmt: skip
def test_memory_from_the_cgroup_files(tmp_path, cgroup, files, expected):
    """Where the engine's stats API reports no memory (seen on the test machine's engine), the cgroup's files."""
    (tmp_path / "proc" / "77").mkdir(parents=True)
    (tmp_path / "proc" / "77" / "cgroup").write_text(cgroup)
    for name, text in files.items():
        (tmp_path / "cg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cg" / name).write_text(text)
    assert lab_status.cgroup_memory(77, str(tmp_path / "cg"), str(tmp_path / "proc")) == expected


def test_documentation_blocks_are_valid_yaml():
    doc = yaml.safe_load(lab_status.DOCUMENTATION)
    assert set(doc["options"]) == {
        "docker_host",
        "gpu",
        "gpu_error",
        "notebook_config_dir",
        "configured_images",
        "backup_store_dir",
        "backup_unit",
        "timeout",
    }
    # its attributes (check mode full, no diff, idempotent) are the fragment attributes.read_only's
    assert "attributes" not in doc
    assert "gpulab.lab.attributes.read_only" in doc["extends_documentation_fragment"]
    assert isinstance(yaml.safe_load(lab_status.EXAMPLES), list)
    returned = yaml.safe_load(lab_status.RETURN)["status"]["contains"]
    assert set(returned) == {"collected_at", "engine", "gpu", "notebooks", "backups"}
