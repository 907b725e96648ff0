"""Tests of library/gpu_facts.py, fed with real and derived nvidia-smi outputs from tests/fixtures/nvidia-smi/.

h200/ is a real capture on an NVIDIA H200; the other folders are derived from it (see their README.md).
"""

import os
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args

from ansible_collections.gpulab.lab.plugins.modules import gpu_facts

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nvidia-smi"
H200_UUID = "GPU-00000000-1111-2222-3333-444444444444"


def fixture_text(case, name):
    return (FIXTURES / case / name).read_text()


def parse(case):
    return gpu_facts.parse_nvidia_smi_xml(fixture_text(case, "nvidia-smi-q.xml"))


# --- parsing the real H200 output ---------------------------------------------------------------


def test_h200_real_output():
    facts = parse("h200")
    assert facts["present"] is True
    assert facts["count"] == 1
    assert facts["driver_version"] == "580.159.04"
    assert facts["cuda_version"] == "13.0"
    assert (facts["cuda_major"], facts["cuda_minor"]) == (13, 0)
    assert facts["nvidia_smi_path"] is None  # filled in by main(), not by the parser
    assert facts["gpus"] == [
        {
            "index": 0,
            "minor_number": 0,
            "uuid": H200_UUID,
            "name": "NVIDIA H200",
            "memory_total_mib": 143771,
            "pci_bus_id": "00000000:00:06.0",
            "compute_capability": None,
            "mig_mode": "Disabled",
            "mig_devices": 0,
        }
    ]


def test_h200_xml_has_no_compute_capability_element():
    """Why the module asks --query-gpu for compute_cap: driver 580's XML has no element for it."""
    root = ET.fromstring(fixture_text("h200", "nvidia-smi-q.xml"))  # noqa: S314 - our own fixture
    tags = {element.tag for element in root.iter()}
    assert [tag for tag in tags if "compute" in tag] == ["compute_mode"]
    assert not [tag for tag in tags if "capab" in tag and tag != "capabilities"]


def test_h200_compute_capability_from_query_gpu():
    # The real query-gpu.csv holds more columns than the module asks for: index first, compute_cap last.
    capabilities = gpu_facts.parse_compute_capabilities(fixture_text("h200", "query-gpu.csv"))
    assert capabilities == {0: "9.0"}
    facts = gpu_facts.merge_compute_capabilities(parse("h200"), capabilities)
    assert facts["gpus"][0]["compute_capability"] == "9.0"


def test_compute_capability_short_query_and_noise():
    text = "0, 9.0\n1, 8.6\n\n2, [N/A]\nsomething else\n"
    assert gpu_facts.parse_compute_capabilities(text) == {0: "9.0", 1: "8.6"}


# --- derived cases --------------------------------------------------------------------------------


def test_h200x4_four_distinct_gpus():
    facts = parse("h200x4")
    assert facts["count"] == 4
    assert facts["present"] is True
    gpus = facts["gpus"]
    assert [gpu["index"] for gpu in gpus] == [0, 1, 2, 3]
    assert [gpu["minor_number"] for gpu in gpus] == [0, 1, 2, 3]
    assert len({gpu["uuid"] for gpu in gpus}) == 4
    assert [gpu["pci_bus_id"] for gpu in gpus] == [
        "00000000:18:00.0",
        "00000000:2A:00.0",
        "00000000:3A:00.0",
        "00000000:5D:00.0",
    ]
    assert {gpu["name"] for gpu in gpus} == {"NVIDIA H200"}
    assert {gpu["memory_total_mib"] for gpu in gpus} == {143771}
    capabilities = gpu_facts.parse_compute_capabilities(fixture_text("h200x4", "query-gpu.csv"))
    merged = gpu_facts.merge_compute_capabilities(facts, capabilities)
    assert [gpu["compute_capability"] for gpu in merged["gpus"]] == ["9.0"] * 4


def test_old_driver_v100():
    facts = parse("old-driver")
    assert facts["driver_version"] == "470.256.02"
    assert facts["cuda_version"] == "11.4"
    assert (facts["cuda_major"], facts["cuda_minor"]) == (11, 4)
    assert facts["count"] == 1
    gpu = facts["gpus"][0]
    assert gpu["name"] == "Tesla V100-SXM2-32GB"
    assert gpu["memory_total_mib"] == 32510
    assert gpu["pci_bus_id"] == "00000000:1A:00.0"
    assert gpu["mig_mode"] == "N/A"
    assert gpu["mig_devices"] == 0
    # 470's nvidia-smi rejects the compute_cap field: nothing to merge, the capability stays None.
    assert gpu_facts.parse_compute_capabilities(fixture_text("old-driver", "query-gpu.txt")) == {}
    assert gpu["compute_capability"] is None


def test_mig_enabled():
    facts = parse("mig-enabled")
    gpu = facts["gpus"][0]
    assert gpu["mig_mode"] == "Enabled"
    assert gpu["mig_devices"] == 2
    # The MIG devices' own fb_memory_usage must not be mistaken for the GPU's.
    assert gpu["memory_total_mib"] == 143771
    assert facts["count"] == 1


# --- output that is not nvidia-smi's XML ----------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(fixture_text("h200", "nvidia-smi-q.xml")[:5000], id="truncated"),
        pytest.param("", id="empty"),
        pytest.param(fixture_text("nvml-mismatch", "nvidia-smi.txt"), id="error-text"),
        pytest.param('<?xml version="1.0" ?>\n<other/>\n', id="wrong-root"),
        pytest.param(
            '<?xml version="1.0"?><!DOCTYPE nvidia_smi_log [<!ENTITY a "aaaa">]><nvidia_smi_log>&a;</nvidia_smi_log>',
            id="entity",
        ),
    ],
)
def test_invalid_xml_is_a_clear_error(text):
    with pytest.raises(gpu_facts.NvidiaSmiOutputError, match="nvidia-smi -q -x printed"):
        gpu_facts.parse_nvidia_smi_xml(text)


# --- failure classification -----------------------------------------------------------------------


def failure_message(case):
    rc = int(fixture_text(case, "exit-code.txt"))
    return gpu_facts.classify_failure(rc, fixture_text(case, "nvidia-smi.txt"), "")


def test_classify_nvml_mismatch():
    msg = failure_message("nvml-mismatch")
    assert "rc 18" in msg
    assert "Driver/library version mismatch" in msg
    assert "kernel module" in msg
    assert "user-space NVIDIA libraries (NVML library version 580.159)" in msg
    assert "driver upgrade without a reboot" in msg
    assert "Reboot the server" in msg
    assert "reload the nvidia kernel modules" in msg


def test_classify_no_driver():
    msg = failure_message("no-driver")
    assert "rc 9" in msg
    assert "kernel driver is not loaded" in msg
    assert "lsmod | grep nvidia" in msg
    assert "dkms status" in msg
    assert "Secure Boot" in msg
    assert "reinstall the NVIDIA driver" in msg


def test_classify_other_failure_includes_everything():
    msg = gpu_facts.classify_failure(
        15, "Unable to determine the device handle for GPU0000:00:06.0: Unknown Error", "oops"
    )
    assert "rc 15" in msg
    assert "Unable to determine the device handle" in msg
    assert "oops" in msg


# --- whole-module runs ----------------------------------------------------------------------------

# A test stand-in for nvidia-smi, not the real program: it prints the recorded outputs of one fixture
# folder and exits with the exit code recorded there (exit-code.txt, query-gpu-exit-code.txt), which is
# what the real nvidia-smi did on that machine. It logs its arguments so tests can check the calls.
FAKE_NVIDIA_SMI = textwrap.dedent(
    """\
    #!@PYTHON@
    # Test stand-in for nvidia-smi (see tests/unit/test_gpu_facts.py): replays fixture files.
    import sys
    from pathlib import Path

    fixture = Path(@FIXTURE@)
    args = sys.argv[1:]
    with open(@LOG@, "a") as log:
        log.write(" ".join(args) + "\\n")


    def replay(name, code):
        sys.stdout.write((fixture / name).read_text())
        sys.exit(code)


    if (fixture / "exit-code.txt").exists():
        replay("nvidia-smi.txt", int((fixture / "exit-code.txt").read_text()))
    if args == ["-q", "-x"]:
        replay("nvidia-smi-q.xml", 0)
    if args and args[0].startswith("--query-gpu="):
        if (fixture / "query-gpu.csv").exists():
            replay("query-gpu.csv", 0)
        replay("query-gpu.txt", int((fixture / "query-gpu-exit-code.txt").read_text()))
    sys.stderr.write("fake nvidia-smi: unexpected arguments %r\\n" % (args,))
    sys.exit(2)
    """
)


def make_fake_nvidia_smi(directory, fixture):
    """Write the stand-in as directory/nvidia-smi, replaying the given fixture folder; returns (path, log)."""
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "calls.log"
    path = directory / "nvidia-smi"
    script = (
        FAKE_NVIDIA_SMI.replace("@PYTHON@", sys.executable)
        .replace("@FIXTURE@", repr(str(fixture)))
        .replace("@LOG@", repr(str(log)))
    )
    path.write_text(script)
    path.chmod(0o755)
    return path, log


class ModuleExit(Exception):
    def __init__(self, result):
        super().__init__(result)
        self.result = result


def run_module(monkeypatch, args):
    """Run gpu_facts.main() with args; return what it passed to exit_json or fail_json (with failed set)."""

    def exit_json(self, **kwargs):
        raise ModuleExit(dict(kwargs, failed=False))

    def fail_json(self, msg, **kwargs):
        raise ModuleExit(dict(kwargs, msg=msg, failed=True))

    monkeypatch.setattr(basic.AnsibleModule, "exit_json", exit_json)
    monkeypatch.setattr(basic.AnsibleModule, "fail_json", fail_json)
    with patch_module_args(args), pytest.raises(ModuleExit) as info:
        gpu_facts.main()
    return info.value.result


def test_module_h200_via_option(tmp_path, monkeypatch):
    path, log = make_fake_nvidia_smi(tmp_path / "bin", FIXTURES / "h200")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = run_module(monkeypatch, {"nvidia_smi_path": str(path)})
    assert result["failed"] is False
    assert result["changed"] is False
    facts = result["ansible_facts"]["gpulab_gpu"]
    assert result["gpu"] == facts
    assert facts["present"] is True
    assert facts["count"] == 1
    assert facts["driver_version"] == "580.159.04"
    assert facts["cuda_version"] == "13.0"
    assert facts["nvidia_smi_path"] == str(path)
    assert facts["gpus"][0]["compute_capability"] == "9.0"
    assert facts["gpus"][0]["memory_total_mib"] == 143771
    assert "msg" not in result
    assert log.read_text().splitlines() == ["-q -x", "--query-gpu=index,compute_cap --format=csv,noheader"]


def test_module_h200x4_via_path(tmp_path, monkeypatch):
    path, _log = make_fake_nvidia_smi(tmp_path / "bin", FIXTURES / "h200x4")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    result = run_module(monkeypatch, {})
    assert result["failed"] is False
    facts = result["gpu"]
    assert facts["nvidia_smi_path"] == str(path)
    assert facts["count"] == 4
    assert [gpu["index"] for gpu in facts["gpus"]] == [0, 1, 2, 3]
    assert [gpu["compute_capability"] for gpu in facts["gpus"]] == ["9.0"] * 4


def test_module_check_mode_gives_the_same_facts(tmp_path, monkeypatch):
    path, _log = make_fake_nvidia_smi(tmp_path / "bin", FIXTURES / "mig-enabled")
    normal = run_module(monkeypatch, {"nvidia_smi_path": str(path)})
    checked = run_module(monkeypatch, {"nvidia_smi_path": str(path), "_ansible_check_mode": True})
    assert checked["failed"] is False
    assert checked["gpu"] == normal["gpu"]
    assert checked["gpu"]["gpus"][0]["mig_mode"] == "Enabled"
    assert checked["gpu"]["gpus"][0]["mig_devices"] == 2


def test_module_old_driver_without_compute_cap(tmp_path, monkeypatch):
    path, log = make_fake_nvidia_smi(tmp_path / "bin", FIXTURES / "old-driver")
    result = run_module(monkeypatch, {"nvidia_smi_path": str(path)})
    assert result["failed"] is False  # the failed compute_cap query is tolerated
    facts = result["gpu"]
    assert facts["driver_version"] == "470.256.02"
    assert (facts["cuda_major"], facts["cuda_minor"]) == (11, 4)
    assert facts["gpus"][0]["compute_capability"] is None
    assert len(log.read_text().splitlines()) == 2


def test_module_nvml_mismatch_fails_with_advice(tmp_path, monkeypatch):
    path, _log = make_fake_nvidia_smi(tmp_path / "bin", FIXTURES / "nvml-mismatch")
    result = run_module(monkeypatch, {"nvidia_smi_path": str(path)})
    assert result["failed"] is True
    assert result["rc"] == 18
    assert "Driver/library version mismatch" in result["msg"]
    assert "Reboot the server" in result["msg"]
    assert result["stdout"] == fixture_text("nvml-mismatch", "nvidia-smi.txt")


def test_module_no_driver_via_path_fails_with_advice(tmp_path, monkeypatch):
    _path, _log = make_fake_nvidia_smi(tmp_path / "bin", FIXTURES / "no-driver")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    result = run_module(monkeypatch, {})
    assert result["failed"] is True
    assert result["rc"] == 9
    assert "kernel driver is not loaded" in result["msg"]
    assert "lsmod | grep nvidia" in result["msg"]


def test_module_without_nvidia_smi(tmp_path, monkeypatch):
    # get_bin_path also looks in the sbin folders, which PATH cannot hide.
    if any(os.path.exists(os.path.join(d, "nvidia-smi")) for d in ("/sbin", "/usr/sbin", "/usr/local/sbin")):
        pytest.skip("this host has an nvidia-smi in an sbin folder")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = run_module(monkeypatch, {})
    assert result["failed"] is False
    assert result["changed"] is False
    facts = result["ansible_facts"]["gpulab_gpu"]
    assert result["gpu"] == facts
    assert facts["present"] is False
    assert facts["count"] == 0
    assert facts["gpus"] == []
    assert facts["driver_version"] is None
    assert facts["nvidia_smi_path"] is None
    assert "no nvidia-smi was found" in result["msg"].lower()
    assert "no NVIDIA driver is installed" in result["msg"]


def test_module_nvidia_smi_path_missing(tmp_path, monkeypatch):
    result = run_module(monkeypatch, {"nvidia_smi_path": str(tmp_path / "nope" / "nvidia-smi")})
    assert result["failed"] is True
    assert "is not an executable file" in result["msg"]


def test_module_invalid_xml(tmp_path, monkeypatch):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "nvidia-smi-q.xml").write_text(fixture_text("h200", "nvidia-smi-q.xml")[:3000])
    path, _log = make_fake_nvidia_smi(tmp_path / "bin", broken)
    result = run_module(monkeypatch, {"nvidia_smi_path": str(path)})
    assert result["failed"] is True
    assert "not valid XML" in result["msg"]


def test_module_timeout(tmp_path, monkeypatch):
    # A stand-in that hangs, as nvidia-smi does with a GPU that fell off the bus.
    path = tmp_path / "nvidia-smi"
    path.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(30)\n")
    path.chmod(0o755)
    result = run_module(monkeypatch, {"nvidia_smi_path": str(path), "timeout": 1})
    assert result["failed"] is True
    assert "did not finish within 1 seconds" in result["msg"]


# --- documentation --------------------------------------------------------------------------------


def test_documentation_blocks_are_valid_yaml():
    doc = yaml.safe_load(gpu_facts.DOCUMENTATION)
    assert doc["module"] == "gpu_facts"
    assert doc["version_added"] == "0.1.0"
    assert doc["author"] == ["gpulab developers (!UNKNOWN)"]
    assert set(doc["options"]) == {"nvidia_smi_path", "timeout", "processes"}
    assert doc["options"]["timeout"]["default"] == 30
    # check_mode, diff_mode and idempotent come from the fragment attributes.read_only (ansible-doc merges them)
    assert {name: value["support"] for name, value in doc["attributes"].items()} == {"facts": "full"}
    assert doc["extends_documentation_fragment"] == [
        "gpulab.lab.attributes",
        "gpulab.lab.attributes.idempotent",
        "gpulab.lab.attributes.facts",
        "gpulab.lab.attributes.read_only",
    ]
    assert isinstance(yaml.safe_load(gpu_facts.EXAMPLES), list)
    returned = yaml.safe_load(gpu_facts.RETURN)
    gpu_keys = set(returned["ansible_facts"]["contains"]["gpulab_gpu"]["contains"])
    assert gpu_keys == set(gpu_facts.empty_facts()) | {"processes"}
    gpu_entry = returned["ansible_facts"]["contains"]["gpulab_gpu"]["contains"]["gpus"]["contains"]
    assert set(gpu_entry) == set(parse("h200")["gpus"][0]) | {"memory_used_mib", "utilization_pct"}
