"""Tests of module_utils/gpu_usage.py and gpu_facts' `processes: true`: who holds GPU memory, in which container.

h200-process/ is a real capture on an NVIDIA H200 while PyTorch held 4 GiB (see its README.md); the module runs here
against the project's nvidia-smi stand-in (tests/harness/nvidia-standin/nvidia-smi-replay.sh), which lists a process
the test starts.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
from ansible.module_utils.testing import patch_module_args
from module_harness import ModuleExit

from ansible_collections.gpulab.lab.plugins.module_utils import gpu_usage
from ansible_collections.gpulab.lab.plugins.modules import gpu_facts

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "nvidia-smi"
CAPTURE = FIXTURES / "h200-process"
STANDIN = ROOT / "tests" / "harness" / "nvidia-standin" / "nvidia-smi-replay.sh"
UUID = "GPU-00000000-1111-2222-3333-444444444444"
CONTAINER = "162368747ddbcc0416cb66eec5a4eebdd0feae9c851c03920054f66d79a4f8b9"
INNER = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

# /proc/<pid>/cgroup of a container's process, read on the host: cgroup v1 with Docker's cgroupfs driver (captured on
# the test machine), cgroup v2 with the systemd driver, and Docker-in-Docker (the molecule instances).
CGROUP_V1_CGROUPFS = "12:hugetlb:/\n11:perf_event:/\n" + "".join(
    f"{n}:{c}:/docker/{CONTAINER}\n" for n, c in ((9, "name=systemd"), (8, "pids"), (4, "memory"), (1, "cpu"), (0, ""))
)
CGROUP_V2_SYSTEMD = f"0::/system.slice/docker-{CONTAINER}.scope\n"
CGROUP_NESTED = f"0::/system.slice/docker-{CONTAINER}.scope/system.slice/docker-{INNER}.scope\n"
CGROUP_NESTED_CGROUPFS = f"4:memory:/docker/{CONTAINER}/docker/{INNER}\n0::/docker/{CONTAINER}/docker/{INNER}\n"


def text(name):
    return (CAPTURE / name).read_text()


# --- the real capture --------------------------------------------------------------------------------------------


def test_real_h200_usage_while_torch_holds_memory():
    assert gpu_usage.parse_gpu_usage(text("query-gpu.csv")) == [
        gpu_usage.GpuUsage(
            index=0, uuid=UUID, name="NVIDIA H200", memory_total_mib=143771, memory_used_mib=4715, utilization_pct=0
        )
    ]


def test_real_h200_compute_apps_name_the_holder():
    holder = json.loads(text("holder.json"))
    assert holder["through"].startswith("torch ")
    assert gpu_usage.parse_compute_apps(text("compute-apps.csv")) == [(holder["pid"], 4706, UUID)]
    # 4706 MiB: the 4096 MiB tensor and the CUDA context; after the holder ended, nothing is listed
    assert gpu_usage.parse_compute_apps(text("compute-apps-after.csv")) == []


def test_real_process_outside_docker_has_no_container():
    assert text("proc-pid-cgroup.txt").startswith("0::/process_api/")
    assert gpu_usage.container_id_from_cgroup(text("proc-pid-cgroup.txt")) is None


def test_parsing_the_capture_gives_what_the_module_gave_on_the_device(tmp_path):
    """The module's result on the real H200, rebuilt here from the raw outputs kept beside it."""
    pid = int(text("holder-pid.txt"))
    (tmp_path / str(pid)).mkdir()
    (tmp_path / str(pid) / "cgroup").write_text(text("proc-pid-cgroup.txt"))
    facts = gpu_facts.parse_nvidia_smi_xml(text("nvidia-smi-q.xml"))
    gpu_facts.merge_compute_capabilities(facts, gpu_facts.parse_compute_capabilities(text("query-gpu.csv")))
    gpu_facts.merge_usage(
        facts,
        gpu_usage.parse_gpu_usage(text("query-gpu.csv")),
        gpu_usage.parse_compute_apps(text("compute-apps.csv")),
        proc=str(tmp_path),
    )
    on_device = json.loads(text("gpu_facts-on-device.json"))["gpu"]
    facts["nvidia_smi_path"] = on_device["nvidia_smi_path"]
    assert facts == on_device
    assert on_device["processes"] == [
        {"pid": 486, "used_memory_mib": 4706, "gpu_uuid": UUID, "gpu_index": 0, "container_id": None}
    ]
    assert on_device["gpus"][0]["memory_used_mib"] == 4715


# --- cgroups -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cgroup", "expected"),
    [
        pytest.param(CGROUP_V1_CGROUPFS, CONTAINER, id="v1-cgroupfs"),
        pytest.param(CGROUP_V2_SYSTEMD, CONTAINER, id="v2-systemd"),
        pytest.param(f"1:name=systemd:/system.slice/docker-{CONTAINER}.scope\n0::/\n", CONTAINER, id="hybrid"),
        pytest.param(CGROUP_NESTED, INNER, id="docker-in-docker-systemd"),
        pytest.param(CGROUP_NESTED_CGROUPFS, INNER, id="docker-in-docker-cgroupfs"),
        pytest.param("0::/user.slice/user-1000.slice/session-3.scope\n", None, id="login-session"),
        pytest.param(f"0::/system.slice/docker-{CONTAINER[:12]}.scope\n", None, id="short-id"),
        pytest.param(f"0::/system.slice/docker-{CONTAINER}.scope.d\n", None, id="not-a-scope"),
        pytest.param("", None, id="empty"),
    ],
)
def test_container_id_from_cgroup(cgroup, expected):
    assert gpu_usage.container_id_from_cgroup(cgroup) == expected


def test_a_process_that_ended_has_no_container(tmp_path):
    assert gpu_usage.container_id_of_pid(424242, proc=str(tmp_path)) is None


def test_processes_join_gpu_index_and_container(tmp_path):
    (tmp_path / "77").mkdir()
    (tmp_path / "77" / "cgroup").write_text(CGROUP_V2_SYSTEMD)
    usage = gpu_usage.parse_gpu_usage((FIXTURES / "h200x4" / "query-gpu.csv").read_text().replace(", 0, 0,", ", 9, 3,"))
    apps = gpu_usage.parse_compute_apps(
        "77, 1200, GPU-00000002-1111-2222-3333-444444444444\n78, [N/A], MIG-1a2b\nNo devices were found\n"
    )
    found = gpu_usage.processes(apps, usage, proc=str(tmp_path))
    assert [(p.pid, p.used_memory_mib, p.gpu_index, p.container_id) for p in found] == [
        (77, 1200, 2, CONTAINER),
        (78, None, None, None),
    ]
    assert [(g.index, g.memory_used_mib, g.utilization_pct) for g in usage] == [(i, 9, 3) for i in range(4)]


# --- the module against the project's nvidia-smi stand-in ------------------------------------------------------------


def run_module(args):
    with patch_module_args(args), pytest.raises(ModuleExit) as info:
        gpu_facts.main()
    return info.value.result


@pytest.fixture
def standin(tmp_path, monkeypatch):
    """The stand-in nvidia-smi replaying the real H200 (0 MiB used), with a processes file; a live process to list."""
    processes = tmp_path / "processes.csv"
    monkeypatch.setenv("GPULAB_NVIDIA_SMI_FIXTURE", str(FIXTURES / "h200"))
    monkeypatch.setenv("GPULAB_NVIDIA_SMI_PROCESSES", str(processes))
    sleeper = subprocess.Popen(["sleep", "60"])
    yield processes, sleeper.pid
    sleeper.kill()
    sleeper.wait()


def test_module_lists_a_live_process_and_adds_its_memory(standin, capture_exit):
    processes, pid = standin
    processes.write_text(f"{pid}, 1034, {UUID}\n999999999, 77, {UUID}\n")  # the second PID does not exist
    result = run_module({"nvidia_smi_path": str(STANDIN), "processes": True})
    facts = result["ansible_facts"]["gpulab_gpu"]
    assert result["changed"] is False
    own = gpu_usage.container_id_of_pid(os.getpid())  # None on a bare host, this container's ID inside one
    assert facts["processes"] == [
        {"pid": pid, "used_memory_mib": 1034, "gpu_uuid": UUID, "gpu_index": 0, "container_id": own}
    ]
    assert (facts["gpus"][0]["memory_used_mib"], facts["gpus"][0]["utilization_pct"]) == (1034, 0)
    assert facts["gpus"][0]["compute_capability"] == "9.0"


def test_module_without_processes_asks_nothing_more(standin, capture_exit):
    processes, pid = standin
    processes.write_text(f"{pid}, 1034, {UUID}\n")
    facts = run_module({"nvidia_smi_path": str(STANDIN)})["gpu"]
    assert "processes" not in facts
    assert "memory_used_mib" not in facts["gpus"][0]


def test_module_processes_in_check_mode(standin, capture_exit):
    processes, pid = standin
    processes.write_text(f"{pid}, 512, {UUID}\n")
    facts = run_module({"nvidia_smi_path": str(STANDIN), "processes": True, "_ansible_check_mode": True})["gpu"]
    assert [p["pid"] for p in facts["processes"]] == [pid]


def test_module_processes_without_gpu(tmp_path, monkeypatch, capture_exit):
    monkeypatch.setenv("PATH", str(tmp_path))
    facts = run_module({"processes": True})["gpu"]
    assert (facts["present"], facts["processes"]) == (False, [])
