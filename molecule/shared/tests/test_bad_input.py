"""Bad input to the docker role: each case fails with a message that says what to change, and nothing on the server
changes (packages, apt sources, daemon.json, dockerd's process). Runs the real role with ansible-playbook against the
scenario's instance, after converge. Last, a daemon.json that passes every check but that dockerd cannot start with is
rolled back: the old file, Docker running again, a container started before still answering."""

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[3]

# (case id, install sources of the scenarios it runs in, extra vars, text the failure must contain)
CASES = [
    ("unknown-source", {"distro"}, {"docker_install_source": "apt"}, "docker_install_source must be one of"),
    (
        "offline-dir-missing",
        {"distro"},
        {"docker_install_source": "offline", "docker_offline_packages_dir": "/nonexistent/gpulab-debs"},
        "does not exist on the control node",
    ),
    (
        "offline-dir-empty",
        {"distro"},
        {"docker_install_source": "offline", "docker_offline_packages_dir": "EMPTY"},
        "holds no .deb files",
    ),
    ("offline-dir-unset", {"distro"}, {"docker_install_source": "offline"}, "docker_offline_packages_dir is empty"),
    ("swap-docker-io-for-ce", {"distro"}, {"docker_install_source": "repo"}, "docker.io is installed"),
    ("swap-ce-for-docker-io", {"repo"}, {"docker_install_source": "distro"}, "docker-ce is installed"),
    ("mirror-does-not-answer", {"repo"}, {"docker_repo_url": "http://127.0.0.1:9/linux/debian"}, "does not answer"),
    (
        "unknown-docker-user",
        {"distro", "repo"},
        {"docker_users": ["student1", "nosuchstudent"]},
        "nosuchstudent, not a user",
    ),
    (
        "daemon-config-not-a-dict",
        {"distro"},
        {"docker_daemon_config": ["live-restore"]},
        "'docker_daemon_config' is of type list",
    ),
    # Debian 12's docker.io 20.10 has no dockerd --validate: gpulab's own schema refuses these before writing.
    (
        "daemon-config-bad-value",
        {"distro"},
        {"docker_daemon_config": {"live-restore": "yes-please"}},
        "Docker would not start with the new /etc/docker/daemon.json, so it was left untouched:"
        " 'live-restore' must be true or false, not the string \"yes-please\"",
    ),
    (
        "daemon-config-unknown-key",
        {"distro"},
        {"docker_daemon_config": {"live-restor": True}},
        "'live-restor' is not a key Docker knows (did you mean 'live-restore'?)",
    ),
    (
        "daemon-config-key-of-a-newer-engine",
        {"distro"},
        {"docker_daemon_config": {"log-format": "json"}},
        "'log-format' needs Docker 25.0 or later; this server runs 20.10",
    ),
    # The engine holds the tiny image converge built: a new data-root would leave it behind.
    (
        "data-root-under-an-engine-with-images",
        {"distro"},
        {"docker_daemon_config": {"data-root": "/srv/gpulab-docker"}},
        "would move Docker's data-root on",
    ),
]


def snapshot(host):
    return host.check_output(
        "sha256sum /etc/docker/daemon.json; "
        "dpkg-query -W -f='${Package} ${Version} ${db:Status-Abbrev}\\n' | sha256sum; "
        "ls -l --time-style=+%s /etc/apt/sources.list.d /etc/apt/keyrings 2>/dev/null; apt-mark showhold; "
        "systemctl show --property MainPID docker.service"  # Docker was not restarted
    )


def run_role(tmp_path, extra_vars):
    playbook = tmp_path / "bad-input.yml"
    playbook.write_text(
        textwrap.dedent("""\
            - name: Apply the docker role with bad input
              hosts: all
              roles:
                - role: gpulab.lab.docker
            """)
    )
    env = dict(os.environ)
    env.update(
        ANSIBLE_COLLECTIONS_PATH=os.pathsep.join(
            [str(PROJECT), env.get("ANSIBLE_COLLECTIONS_PATH", "~/.ansible/collections")]
        ),
        ANSIBLE_PIPELINING="true",
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
    )
    return subprocess.run(
        [
            "ansible-playbook",
            "-i",
            os.environ["MOLECULE_INVENTORY_FILE"],
            str(playbook),
            "--extra-vars",
            json.dumps(extra_vars),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.parametrize(("sources", "extra_vars", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_clearly_and_changes_nothing(host, tmp_path, sources, extra_vars, expected):
    source = host.ansible.get_variables()["docker_install_source"]
    if source not in sources:
        pytest.skip(f"case for the {'/'.join(sorted(sources))} scenario; this one installs from {source}")
    if extra_vars.get("docker_offline_packages_dir") == "EMPTY":
        (tmp_path / "debs").mkdir()
        extra_vars = {**extra_vars, "docker_offline_packages_dir": str(tmp_path / "debs")}
    before = snapshot(host)
    result = run_role(tmp_path, extra_vars)
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0, output[-3000:]
    assert expected in output, output[-3000:]
    assert "changed=0" in output, output[-3000:]
    assert snapshot(host) == before


def test_data_root_refusal_names_what_stays_behind_and_how_to_move_it(host, tmp_path):
    if host.ansible.get_variables()["docker_install_source"] != "distro":
        pytest.skip("runs in the distro scenario")
    result = run_role(tmp_path, {"docker_daemon_config": {"data-root": "/srv/gpulab-docker/"}})
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0
    assert "from /var/lib/docker to /srv/gpulab-docker, but the engine holds" in output, output[-3000:]
    assert "image(s) (" in output and "gpulab-test/true:latest" in output, output[-3000:]
    assert "rsync -aHAX --numeric-ids /var/lib/docker/ /srv/gpulab-docker/" in output, output[-3000:]
    assert not host.file("/srv/gpulab-docker").exists


def test_daemon_json_that_is_not_json_is_left_untouched(host, tmp_path):
    if host.ansible.get_variables()["docker_install_source"] != "distro":
        pytest.skip("runs in the distro scenario")
    original = host.file("/etc/docker/daemon.json").content_string
    broken = '{"live-restore": true,, "admin": "typo"}\n'
    host.run_expect([0], "cp /etc/docker/daemon.json /root/daemon.json.keep")
    host.run_expect([0], f"printf '%s' '{broken}' > /etc/docker/daemon.json")
    try:
        before = snapshot(host)
        result = run_role(tmp_path, {})
        output = " ".join((result.stdout + result.stderr).split())
        assert result.returncode != 0
        assert "is not valid JSON" in output or "not valid JSON" in output, output[-3000:]
        assert "left untouched" in output or "untouched" in output, output[-3000:]
        assert host.file("/etc/docker/daemon.json").content_string == broken
        assert snapshot(host) == before
    finally:
        host.run_expect([0], "cp /root/daemon.json.keep /etc/docker/daemon.json")
    assert host.file("/etc/docker/daemon.json").content_string == original


SLEEPER = "gpulab-test-sleeper"


@pytest.fixture
def sleeping_container(host):
    """A container of a tiny local image (sleep and true from the instance, FROM scratch) that runs a long sleep."""
    host.check_output(
        "set -e; d=/var/tmp/gpulab-sleeper; rm -rf $d; mkdir -p $d/rootfs/bin $d/rootfs/lib/x86_64-linux-gnu"
        " $d/rootfs/lib64; cp /bin/sleep /bin/true $d/rootfs/bin/; cp /lib/x86_64-linux-gnu/libc.so.6"
        " $d/rootfs/lib/x86_64-linux-gnu/; cp /lib64/ld-linux-x86-64.so.2 $d/rootfs/lib64/;"
        " printf 'FROM scratch\\nCOPY rootfs/ /\\n' > $d/Dockerfile; docker build -q -t gpulab-test/sleeper:latest $d"
    )
    host.check_output(
        f"docker run -d --name {SLEEPER} --network none gpulab-test/sleeper:latest /bin/sleep 100000"
    )  # fmt: skip
    yield host.check_output(f"docker inspect --format '{{{{.State.Pid}}}}' {SLEEPER}").strip()
    host.run(f"docker rm -f {SLEEPER}")


def test_a_daemon_json_dockerd_cannot_start_with_is_rolled_back(host, tmp_path, sleeping_container):
    """hosts passes every check, but Debian's unit starts dockerd with -H fd://, and dockerd refuses a setting that is
    both a flag and a key of the file: it does not start. The old file goes back, Docker runs again (a second run is
    not refused with "Start request repeated too quickly"), and the container kept running all along (live-restore)."""
    if host.ansible.get_variables()["docker_install_source"] != "distro":
        pytest.skip("runs in the distro scenario")
    original = host.file("/etc/docker/daemon.json").content_string
    result = run_role(tmp_path, {"docker_daemon_config": {"hosts": ["unix:///run/gpulab-test-docker.sock"]}})
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0
    assert "Docker did not start with the new /etc/docker/daemon.json (changed: hosts (docker_daemon_config))" in output
    assert (
        "dockerd said: unable to configure the Docker daemon with file /etc/docker/daemon.json: the following"
        " directives are specified both as a flag and in the configuration file: hosts" in output
    ), output[-3000:]
    assert "The previous configuration is back and Docker runs again with it" in output, output[-3000:]
    assert host.file("/etc/docker/daemon.json").content_string == original
    assert host.service("docker").is_running
    # The container started before never stopped: same process, and the engine reaches it again.
    assert host.check_output(f"docker inspect --format '{{{{.State.Pid}}}}' {SLEEPER}").strip() == sleeping_container
    host.run_expect([0], f"docker exec {SLEEPER} /bin/true")
    again = run_role(tmp_path, {})
    output = " ".join((again.stdout + again.stderr).split())
    assert again.returncode == 0, output[-3000:]
    assert "changed=0" in output, output[-3000:]
