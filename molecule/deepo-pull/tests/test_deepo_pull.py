"""Checks of role deepo with deepo_image_source: pull on a Debian 12 lab server without a GPU, after converge.

prepare started Debian's docker-registry on the instance's 127.0.0.1:5000, pushed
127.0.0.1:5000/gpulab-test/deepo:all-py38-cpu and 127.0.0.1:5000/gpulab-test/mirrored:1 (their IDs are in
/var/tmp/gpulab-deepo-pull/<name>.id) and removed them locally. converge pulled the first by its registry name (tag
auto: the CPU tag) and gpulab-test/mirrored:1 by its Docker Hub name, which only the mirror
(deepo_registry_mirrors: [http://127.0.0.1:5000]) can serve here. converge is playbooks/deepo.yml: role docker, the one
owner of daemon.json, merged the mirror (deepo_docker_daemon_config_dependent) before role deepo pulled.
"""

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared" / "tests"))
from playbook_run import playbook_runner, run_playbook

BUILD = "/var/tmp/gpulab-deepo-pull"
MAIN = "127.0.0.1:5000/gpulab-test/deepo:all-py38-cpu"


@pytest.fixture(scope="module")
def deepo_play(host, tmp_path_factory):
    return playbook_runner(host.backend.host, "gpulab.lab.deepo", tmp_path_factory.mktemp("inventory"), timeout=300)


def image_id(host, name):
    result = host.run(f"docker image inspect --format '{{{{.Id}}}}' {name}")
    return result.stdout.strip() if result.rc == 0 else None


def test_pulled_from_the_local_registry(host):
    assert image_id(host, MAIN) == host.file(f"{BUILD}/deepo.id").content_string.strip()


def test_pulled_through_the_mirror(host):
    """gpulab-test/mirrored:1 is a Docker Hub name; Docker Hub is unreachable, so it came through the mirror."""
    assert image_id(host, "gpulab-test/mirrored:1") == host.file(f"{BUILD}/mirrored.id").content_string.strip()


def test_daemon_json_holds_the_mirror_and_keeps_the_other_keys(host):
    data = json.loads(host.file("/etc/docker/daemon.json").content_string)
    assert data["registry-mirrors"] == ["http://127.0.0.1:5000"]
    assert data["max-concurrent-downloads"] == 7  # the admin's keys, put there before gpulab ran
    assert data["labels"] == ["gpulab-test=admin-key"]
    # Role docker wrote the file, so its own defaults came with the mirror, merged key by key into the admin's keys.
    assert data["log-opts"] == {"labels": "gpulab", "max-size": "100m", "max-file": "3"}
    assert data["live-restore"] is True


def test_docker_runs_with_the_mirror(host):
    mirrors = json.loads(host.check_output("docker info --format '{{json .RegistryConfig.Mirrors}}'"))
    assert mirrors == ["http://127.0.0.1:5000/"]


def test_deepo_alone_refuses_to_pull_without_the_mirrors(host, tmp_path):
    """Role deepo leaves daemon.json to role docker: run without the playbook's wiring, on an engine without the
    mirror, it stops before pulling and says how to get the mirror merged."""
    hostname = host.backend.host
    playbook = tmp_path / "deepo-role-alone.yml"
    playbook.write_text("- name: Role deepo alone\n  hosts: all\n  roles:\n    - role: gpulab.lab.deepo\n")
    extra = {"deepo_registry_mirrors": ["http://127.0.0.1:5001"]}
    run = run_playbook(hostname, str(playbook), extra)
    assert run.rc != 0
    assert "runs without the registry mirrors http://127.0.0.1:5001" in run, run.raw[-3000:]
    assert "Nothing was pulled." in run
    assert run.changed == 0


def test_pull_policy_missing_keeps_and_always_pulls_a_moved_tag(host, deepo_play):
    old = image_id(host, MAIN)
    # The tag moves in the registry: a new image under the same name.
    host.check_output(
        f"printf 'FROM {MAIN}\\nLABEL io.gpulab.test.moved=1\\n' | docker build -q -t {MAIN} - && docker push {MAIN}"
    )
    new = image_id(host, MAIN)
    host.check_output(f"docker tag {old} {MAIN}")  # the server still has the old image under the name
    assert new != old

    missing = deepo_play({})
    assert missing.rc == 0, missing.raw[-3000:]
    assert missing.changed == 0
    assert image_id(host, MAIN) == old

    always = deepo_play({"deepo_pull_policy": "always"})
    assert always.rc == 0, always.raw[-3000:]
    assert always.changed > 0
    assert image_id(host, MAIN) == new


def test_a_pull_reports_layers_and_bytes(host, deepo_play):
    """A 48 MiB layer comes down from the registry; the run says how many layers and MiB it downloaded."""
    name = "127.0.0.1:5000/gpulab-test/big:1"
    host.check_output(
        "set -e; d=$(mktemp -d); head -c 50331648 /dev/urandom > $d/blob; "
        f"printf 'FROM {MAIN}\\nCOPY blob /blob\\n' > $d/Dockerfile; docker build -q -t {name} $d >/dev/null; "
        f"docker push -q {name} >/dev/null; docker rmi {name} >/dev/null; rm -r $d"
    )
    repository, tag = name.rsplit(":", 1)
    run = deepo_play({"deepo_image_repository": repository, "deepo_image_tag": tag, "deepo_progress_interval": 1})
    assert run.rc == 0, run.raw[-3000:]
    text = " ".join(run.raw.replace("\\n", " ").split())
    report = re.search(r"Downloaded newer image for \S+: (\d+) of (\d+) layers downloaded \(([\d.]+) MiB\)", text)
    assert report, run.raw[-3000:]
    downloaded, total, mib = int(report[1]), int(report[2]), float(report[3])
    assert downloaded == 1 and total >= 2  # the new layer came down; the base image's layers were there
    assert 20 < mib < 49  # the compressed size of 48 MiB of random data: about as large as the data itself
    assert image_id(host, name) is not None
