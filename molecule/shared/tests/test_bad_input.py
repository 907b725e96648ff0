"""Bad input to the docker role: each case fails with a message that says what to change, and nothing on the server
changes (packages, apt sources, daemon.json). Runs the real role with ansible-playbook against the scenario's
instance, after converge."""

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
]


def snapshot(host):
    return host.check_output(
        "sha256sum /etc/docker/daemon.json; "
        "dpkg-query -W -f='${Package} ${Version} ${db:Status-Abbrev}\\n' | sha256sum; "
        "ls -l --time-style=+%s /etc/apt/sources.list.d /etc/apt/keyrings 2>/dev/null; apt-mark showhold"
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
