"""Tests of the deepo role's tag choice (plugins/filter/deepo_tags.py) against the role's real tag table
(roles/deepo/vars/main.yml) and gpu_facts' real output: the H200 capture (driver 580, CUDA 13.0), the V100 case
derived from it (driver 470, CUDA 11.4), and older drivers derived from those by changing the CUDA version only.
"""

import copy
import importlib
import json
from pathlib import Path

import pytest
import yaml

from ansible_collections.gpulab.lab.plugins.modules import gpu_facts

ROOT = Path(__file__).resolve().parents[2]
deepo_tags = importlib.import_module("ansible_collections.gpulab.lab.plugins.filter.deepo_tags")

FIXTURES = ROOT / "tests" / "fixtures" / "nvidia-smi"
ROLE_VARS = ROOT / "ansible_collections" / "gpulab" / "lab" / "roles" / "deepo" / "vars" / "main.yml"
TABLE = yaml.safe_load(ROLE_VARS.read_text())["__deepo_tag_table"]


def h200():
    """gpu_facts' result on the real H200 (tests/fixtures/nvidia-smi/h200/gpu_facts-on-device.json)."""
    return json.loads((FIXTURES / "h200" / "gpu_facts-on-device.json").read_text())["gpu"]


def with_cuda(version):
    """The H200's facts as an older driver would report them: only the CUDA version differs."""
    facts = copy.deepcopy(h200())
    major, minor = version.split(".")
    facts.update(cuda_version=version, cuda_major=int(major), cuda_minor=int(minor))
    return facts


NO_GPU = {"present": False, "count": 0, "gpus": [], "cuda_version": None, "cuda_major": None, "cuda_minor": None}


def test_the_table_is_well_formed():
    for row in TABLE:
        assert set(row) == {"framework", "jupyter", "cuda", "tag"}, row
    assert len({row["tag"] for row in TABLE}) == len(TABLE)
    # every (framework, jupyter) pair has a CPU tag, so a host without a GPU always gets one
    for key in {(row["framework"], row["jupyter"]) for row in TABLE}:
        assert any(row["cuda"] is None for row in TABLE if (row["framework"], row["jupyter"]) == key), key


def test_real_h200_cuda_13_gets_the_newest_tag():
    facts = h200()
    assert facts["cuda_version"] == "13.0"
    assert deepo_tags.pick_tag(TABLE, facts) == "all-py38-cu113"
    assert deepo_tags.pick_tag(TABLE, facts, "pytorch") == "pytorch-py38-cu113"
    assert deepo_tags.pick_tag(TABLE, facts, "all", jupyter=True) == "all-jupyter-py36-cu100"


def test_real_v100_driver_470_cuda_11_4():
    facts = gpu_facts.parse_nvidia_smi_xml((FIXTURES / "old-driver" / "nvidia-smi-q.xml").read_text())
    assert facts["cuda_version"] == "11.4"
    assert deepo_tags.pick_tag(TABLE, facts, "tensorflow") == "tensorflow-py38-cu113"


@pytest.mark.parametrize(
    ("cuda", "framework", "expected"),
    [
        ("11.3", "all", "all-py38-cu113"),  # exactly the tag's version
        ("11.2", "all", "all-py36-cu100"),  # one minor too old for cu113
        ("10.2", "pytorch", "pytorch-py36-cu100"),
        ("10.0", "tensorflow", "tensorflow-py36-cu100"),
        ("9.2", "all", "all-py36-cu90"),
        ("9.0", "pytorch", "pytorch-py36-cu90"),
    ],
)
def test_older_drivers_get_the_newest_tag_they_can_run(cuda, framework, expected):
    assert deepo_tags.pick_tag(TABLE, with_cuda(cuda), framework) == expected


def test_no_gpu_gets_the_cpu_tag():
    assert deepo_tags.pick_tag(TABLE, NO_GPU) == "all-py38-cpu"
    assert deepo_tags.pick_tag(TABLE, NO_GPU, "all", jupyter=True) == "all-py36-jupyter-cpu"
    assert deepo_tags.pick_tag(TABLE, None, "pytorch") == "pytorch-py38-cpu"


def test_no_tag_fits_names_the_driver_cuda_and_the_candidates():
    with pytest.raises(deepo_tags.NoTagFits) as info:
        deepo_tags.pick_tag(TABLE, with_cuda("8.0"))
    msg = str(info.value)
    assert "CUDA up to 8.0" in msg
    for tag in ("all-py38-cu113 (CUDA 11.3)", "all-py36-cu100 (CUDA 10.0)", "all-py36-cu90 (CUDA 9.0)"):
        assert tag in msg


def test_keras_has_no_cuda_9_tag():
    with pytest.raises(deepo_tags.NoTagFits, match=r"CUDA up to 9\.2.*keras-py36-cu100"):
        deepo_tags.pick_tag(TABLE, with_cuda("9.2"), "keras")


def test_unknown_framework_lists_the_known_ones():
    with pytest.raises(deepo_tags.NoTagFits, match="knows the frameworks all, keras, mxnet, pytorch, tensorflow"):
        deepo_tags.pick_tag(TABLE, h200(), "caffe")


def test_jupyter_only_for_all():
    with pytest.raises(deepo_tags.NoTagFits, match="framework pytorch with Jupyter"):
        deepo_tags.pick_tag(TABLE, h200(), "pytorch", jupyter=True)


def test_the_filter_returns_the_error_instead_of_raising():
    filters = deepo_tags.FilterModule().filters()
    assert filters["deepo_pick_tag"](TABLE, h200()) == {"tag": "all-py38-cu113", "error": ""}
    result = filters["deepo_pick_tag"](TABLE, with_cuda("8.0"))
    assert result["tag"] == ""
    assert result["error"].startswith("deepo_image_tag is auto, but the NVIDIA driver supports CUDA up to 8.0")


def test_a_new_row_extends_the_table():
    table = [*TABLE, {"framework": "all", "jupyter": False, "cuda": "12.4", "tag": "all-py310-cu124"}]
    assert deepo_tags.pick_tag(table, h200()) == "all-py310-cu124"
    assert deepo_tags.pick_tag(table, with_cuda("12.2")) == "all-py38-cu113"
