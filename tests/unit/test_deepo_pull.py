"""Tests of library/docker_image_pull_progress.py: the pull-progress tracker on the engine's message stream, registry
credentials, and the module against the real Docker engine of the test machine (no registry is reachable here: pulls
that need one are tested in molecule/deepo-pull, against a real registry on the instance)."""

import base64
import json

import pytest
from ansible.module_utils.testing import patch_module_args
from module_harness import ModuleExit

from ansible_collections.gpulab.lab.plugins.module_utils import docker_api as api
from ansible_collections.gpulab.lab.plugins.modules import docker_image_pull_progress as pull

SOCKET = "unix:///var/run/docker.sock"
PRESENT = "gpulab-test/debian:12"  # the harness's base image, always on a test machine

pytestmark = pytest.mark.usefixtures("capture_exit")


def messages(layer_sizes, present=()):
    """The messages Docker 20.10 sends for a pull (POST /images/create), as its API documents and sends them."""
    yield {"status": "Pulling from gpulab-test/deepo", "id": "all-py38-cpu"}
    for layer in present:
        yield {"status": "Already exists", "progressDetail": {}, "id": layer}
    for layer in layer_sizes:
        yield {"status": "Pulling fs layer", "progressDetail": {}, "id": layer}
    for layer in layer_sizes:
        yield {"status": "Waiting", "progressDetail": {}, "id": layer}
    for layer, size in layer_sizes.items():
        for current in range(0, size + 1, max(size // 4, 1)):
            yield {
                "status": "Downloading",
                "progressDetail": {"current": current, "total": size},
                "progress": "[==>   ]",
                "id": layer,
            }
        yield {"status": "Verifying Checksum", "progressDetail": {}, "id": layer}
        yield {"status": "Download complete", "progressDetail": {}, "id": layer}
    for layer, size in layer_sizes.items():
        yield {"status": "Extracting", "progressDetail": {"current": size, "total": size}, "id": layer}
        yield {"status": "Pull complete", "progressDetail": {}, "id": layer}
    yield {"status": "Digest: sha256:" + "ab" * 32}
    yield {"status": "Status: Downloaded newer image for gpulab-test/deepo:all-py38-cpu"}


def test_tracker_counts_layers_and_bytes_as_the_pull_goes():
    sizes = {"1111aaaa2222": 4000, "3333bbbb4444": 6000}
    tracker = pull.PullProgress("all-py38-cpu")
    seen = []
    for msg in messages(sizes, present=["5555cccc6666"]):
        tracker.feed(msg)
        seen.append((tracker.phase(), tracker.figures()))
    # Part way: the first layer half downloaded, the second not started; the existing layer counts as done.
    halfway = next(f for phase, f in seen if f["bytes_done"] == 2000)
    assert halfway == {"layers_done": 1, "layers_total": 3, "bytes_done": 2000, "bytes_total": 4000}
    assert seen[-1][1] == {"layers_done": 3, "layers_total": 3, "bytes_done": 10000, "bytes_total": 10000}
    assert [p for p, _ in seen].count("extracting") >= 1
    assert seen[-1][0] == "finishing"
    assert tracker.status == "Status: Downloaded newer image for gpulab-test/deepo:all-py38-cpu"
    # The tag's own "Pulling from" message is not a layer.
    assert "all-py38-cpu" not in tracker.layers


def test_tracker_with_every_layer_present_downloads_nothing():
    tracker = pull.PullProgress("1")
    for msg in messages({}, present=["aaaa", "bbbb"]):
        tracker.feed(msg)
    assert tracker.figures() == {"layers_done": 2, "layers_total": 2, "bytes_done": 0, "bytes_total": 0}


def test_tracker_ignores_what_is_not_a_message():
    tracker = pull.PullProgress("1")
    tracker.feed("plain text from an old engine")
    tracker.feed({"status": "Downloading", "progressDetail": {"current": 5}, "id": "cccc"})
    assert tracker.figures()["bytes_done"] == 5


@pytest.mark.parametrize(
    ("name", "registry"),
    [
        ("ufoym/deepo", "docker.io"),
        ("ubuntu", "docker.io"),
        ("127.0.0.1:5000/gpulab-test/deepo", "127.0.0.1:5000"),
        ("registry.lab.example/deepo", "registry.lab.example"),
        ("localhost/deepo", "localhost"),
    ],
)
def test_registry_of(name, registry):
    assert pull.registry_of(name) == registry


def test_registry_auth_from_docker_login(tmp_path):
    config = tmp_path / "config.json"
    login = {"auth": base64.b64encode(b"ann:s3:cret").decode()}
    config.write_text(json.dumps({"auths": {"registry.lab.example": login}}))
    header = pull.registry_auth(str(config), "registry.lab.example")
    creds = json.loads(base64.urlsafe_b64decode(header))
    assert creds == {"username": "ann", "password": "s3:cret", "serveraddress": "registry.lab.example"}
    assert pull.registry_auth(str(config), "docker.io") is None
    assert pull.registry_auth(str(tmp_path / "missing.json"), "docker.io") is None
    config.write_text("not json")
    assert pull.registry_auth(str(config), "registry.lab.example") is None


def run(check_mode=False, **params):
    """The module's result (or failure) on the real engine; exit_json/fail_json raise (tests/unit/conftest.py)."""
    args = {"docker_host": SOCKET, "_ansible_check_mode": check_mode, **params}
    with patch_module_args(args), pytest.raises(ModuleExit) as info:
        pull.main()
    return info.value.result


def test_present_image_is_not_pulled():
    name, tag = PRESENT.split(":")
    result = run(name=name, tag=tag)
    assert result["changed"] is False
    assert result["image_id"] == api.Engine(SOCKET).image(PRESENT)["Id"]
    assert "not pulled" in result["status"]


def test_check_mode_predicts_a_pull_of_a_missing_image_and_pulls_nothing():
    result = run(check_mode=True, name="127.0.0.1:9/gpulab-test/missing", tag="1")
    assert result["changed"] is True
    assert result["image_id"] is None
    assert not api.Engine(SOCKET).has_image("127.0.0.1:9/gpulab-test/missing:1")


def test_unreachable_registry_is_a_clear_error_and_leaves_no_progress_file(tmp_path):
    progress = tmp_path / "pull.progress"
    result = run(name="127.0.0.1:9/gpulab-test/missing", tag="1", progress_file=str(progress))
    assert result["failed"] is True
    assert result["msg"].startswith("Pulling 127.0.0.1:9/gpulab-test/missing:1 failed: ")
    assert "127.0.0.1:9" in result["msg"] and "connection refused" in result["msg"].lower()
    assert not progress.exists()
