"""Checks every docker scenario shares: the engine a lab server ends up with, through the real engine."""

import json

import pytest


@pytest.fixture(scope="module")
def test_vars(host):
    return host.ansible.get_variables()


@pytest.fixture(scope="module")
def docker_info(host):
    return json.loads(host.check_output("docker info --format '{{json .}}'"))


def test_engine_is_running_and_enabled(host):
    docker = host.service("docker")
    assert docker.is_running
    assert docker.is_enabled


def test_engine_uses_overlay2_and_the_merged_daemon_json(docker_info):
    assert docker_info["Driver"] == "overlay2"
    # The admin's key reached dockerd (labels show in `docker info`), and so did gpulab's default.
    assert "gpulab-test=admin-key" in docker_info["Labels"]
    assert docker_info["LiveRestoreEnabled"] is True
    assert docker_info["LoggingDriver"] == "json-file"


def test_engine_packages_are_installed_and_held(host, test_vars):
    held = host.check_output("apt-mark showhold").split()
    for package in test_vars["gpulab_test_engine_packages"]:
        assert host.package(package).is_installed, package
        assert package in held, f"{package} is not held: {held}"


def test_a_container_runs_from_a_local_image(host):
    run = host.run("docker run --rm --network none gpulab-test/true:latest")
    assert run.rc == 0, run.stderr
    # The engine really runs what the image holds: a binary the image lacks fails.
    missing = host.run("docker run --rm --network none gpulab-test/true:latest /bin/sh -c true")
    assert missing.rc != 0


def test_docker_users_are_in_the_docker_group(host, test_vars):
    assert test_vars["docker_users"], "the scenario must name docker_users"
    for user in test_vars["docker_users"]:
        assert "docker" in host.user(user).groups


def test_daemon_json_keeps_the_admins_keys(host):
    daemon_json = host.file("/etc/docker/daemon.json")
    assert daemon_json.mode == 0o644
    data = json.loads(daemon_json.content_string)
    # Written by the admin before gpulab ran: still there.
    assert data["max-concurrent-downloads"] == 7
    assert data["labels"] == ["gpulab-test=admin-key"]
    # Nested keys merged key by key: the admin's log label and gpulab's rotation side by side.
    assert data["log-opts"] == {"labels": "gpulab", "max-size": "100m", "max-file": "3"}
    assert data["live-restore"] is True


def test_daemon_json_previous_version_was_backed_up(host):
    backups = host.check_output("ls /etc/docker/ | grep '^daemon.json\\..*~$' || true").split()
    assert backups, "no backup of the admin's daemon.json"
    # One of them (other tests change the file too) is the admin's file as gpulab found it.
    old = [json.loads(host.file(f"/etc/docker/{name}").content_string) for name in backups]
    assert any("live-restore" not in data and data["max-concurrent-downloads"] == 7 for data in old), old
