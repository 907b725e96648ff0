"""README.md's "Using gpulab on your servers", step by step, as a lab's admin follows it on the control node, against
an existing Debian 12 server that gpulab has never seen (molecule.yml and prepare.yml say what is on it).

The admin's control node is this machine with none of molecule's Ansible settings, a known_hosts file of its own and
the admin's and the student's keys made in prepare; the access sheet lands in ~/.gpulab/access (the default) and is
removed afterwards. Every run is
`ansible-playbook -i inventory/<lab>/hosts.yml site.yml ...` from the clone's root, so gpulab's own ansible.cfg
applies, and Ansible reaches the server over SSH (port 2222, on Docker's bridge network) as labadmin, who becomes root
with sudo and its password. The inventory is a copy of inventory/example/ with the server listed and only what this
network forces set: Debian's docker.io (no Docker repository is reachable), the deep-learning-like test image from its
archive (no registry), one student with a token.

The tests run in this file's order, each step on the server as the steps before it left it: an unknown host key and
a missing sudo password stop the run before anything changes; --check --diff predicts and changes nothing; the run;
the run again (changed=0); then, over SSH, Docker, the notebook (200 with the token, 403 without) and the access
sheet's ssh command, whose tunnel the student opens.
"""

import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared" / "tests"))
from jupyter_client import Jupyter
from playbook_run import PROJECT_DIR, Run
from ssh_tunnel import sheet_tunnel

EPHEMERAL = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"])
KEYS = EPHEMERAL / "ssh"
ADMIN_KEY, STUDENT_KEY = KEYS / "labadmin", KEYS / "student1"
SUDO_PASSWORD = KEYS / "labadmin-sudo-password"
CLIENT = Path(__file__).resolve().parents[2] / "shared" / "tests" / "jupyter_client.py"
SSH_PORT = 2222
SERVER = "gpu01.lab.example.org"  # the example's first server name; Ansible reaches it at ansible_host
TOKEN = secrets.token_hex(24)
STUDENT = {"name": "student1", "port": 7777, "workdir": "/srv/notebooks/student1", "token": TOKEN}
ARCHIVE = PROJECT_DIR / ".cache" / "demo" / "dl-notebook.tar.zst"
IMAGE = "gpulab-test/dl-notebook"
SHEET = Path.home() / ".gpulab" / "access" / f"{SERVER}.txt"  # notebook_access_dir's default
RUNS = EPHEMERAL / "runs"


@pytest.fixture(scope="module")
def instance(host):
    return host.backend.host


@pytest.fixture(scope="module")
def address(instance):
    """The server's address on Docker's bridge network: what the admin writes as ansible_host."""
    out = docker("inspect", "--format", "{{json .NetworkSettings.Networks}}", instance)
    return json.loads(out)["bridge"]["IPAddress"]


def docker(*args):
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120, check=True).stdout


def snapshot(instance):
    """What a check-mode run must leave as it was on the server (read through docker exec, not through the admin's
    SSH): packages, the files gpulab would write or change, accounts, Docker's data."""
    script = (
        "dpkg-query --show --showformat='${Package} ${Version} ${db:Status-Abbrev}\\n';"
        " find /etc /srv /opt /usr/local /var/cache /var/lib/docker /var/backups -xdev"
        " -printf '%p %y %m %u %g %s %T@\\n' 2>&1 | sort; getent passwd; getent group"
    )
    return docker("exec", instance, "bash", "-c", script)


@pytest.fixture(scope="module")
def known_hosts(tmp_path_factory):
    """The admin's laptop's known_hosts, empty: the laptop has never reached the server."""
    path = tmp_path_factory.mktemp("control-node") / "known_hosts"
    path.touch(mode=0o600)
    return path


@pytest.fixture(scope="module")
def lab(address):
    """Step 2: inventory/example/ copied to inventory/<lab>/, the server listed in hosts.yml and the lab's settings in
    group_vars/gpu_servers.yml (the example's own settings kept, but for the ones this network forces)."""
    lab = PROJECT_DIR / "inventory" / f"ssh-admin-test-{secrets.token_hex(4)}"
    shutil.copytree(PROJECT_DIR / "inventory" / "example", lab)
    try:
        hosts_file = lab / "hosts.yml"
        hosts = yaml.safe_load(hosts_file.read_text())
        group = hosts["all"]["children"]["gpu_servers"]
        assert group["vars"]["ansible_user"] == "labadmin"  # the example's account with sudo, kept as it is
        group["hosts"] = {
            SERVER: {
                "ansible_host": address,
                "ansible_port": SSH_PORT,
                "ansible_ssh_private_key_file": str(ADMIN_KEY),
            }
        }
        write_yaml(hosts_file, hosts)
        settings_file = lab / "group_vars" / "gpu_servers.yml"
        settings = yaml.safe_load(settings_file.read_text()) or {}
        settings.update(
            {
                "docker_install_source": "distro",
                "deepo_image_source": "archive",
                "deepo_image_repository": IMAGE,
                "deepo_image_tag": "latest",
                "deepo_image_archive": str(ARCHIVE),
                "notebook_users": [STUDENT],
            }
        )
        write_yaml(settings_file, settings)
        yield lab
    finally:
        shutil.rmtree(lab, ignore_errors=True)
        SHEET.unlink(missing_ok=True)


class _YamlDumper(yaml.SafeDumper):
    """Lists indented under their key, as the project's yamllint wants them (the lab folder is in the clone)."""

    def increase_indent(self, flow=False, indentless=False):
        return super().increase_indent(flow, False)


def write_yaml(path, data):
    path.write_text("---\n" + yaml.dump(data, Dumper=_YamlDumper, sort_keys=False, width=110))


def site(lab, known_hosts, *options):
    """Step 3: `ansible-playbook -i inventory/<lab>/hosts.yml site.yml OPTIONS` from the clone's root, in the
    virtual environment, with the laptop's known_hosts and none of molecule's ANSIBLE_* settings (so gpulab's
    ansible.cfg is the one read). The output is kept in the scenario's ephemeral folder, runs/."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ANSIBLE_", "MOLECULE_"))}
    venv_bin = str(Path(sys.executable).parent)
    env.update(
        PATH=os.pathsep.join([venv_bin, env.get("PATH", "")]),
        VIRTUAL_ENV=str(Path(venv_bin).parent),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_CALLBACKS_ENABLED="ansible.posix.profile_tasks",  # each task's time in the kept output
        # ssh reads ~/.ssh/known_hosts from the account's passwd entry, not $HOME: the laptop's file, named.
        ANSIBLE_SSH_COMMON_ARGS=f"-o UserKnownHostsFile={known_hosts}",
    )
    inventory = lab.relative_to(PROJECT_DIR) / "hosts.yml"
    command = ["ansible-playbook", "-i", str(inventory), "site.yml", *options]
    proc = subprocess.run(command, cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=900, check=False)
    RUNS.mkdir(exist_ok=True)
    log = RUNS / f"{len(list(RUNS.iterdir())):02d}-site{''.join(options).replace('-', '_')}.log"
    log.write_text(f"$ {' '.join(command)}\n{proc.stdout}{proc.stderr}")
    return Run(proc, SERVER)


def ssh(address, command, *, known_hosts, stdin=None):
    """A command on the server over SSH, as the admin runs it from the laptop."""
    options = ["-p", str(SSH_PORT), "-i", str(ADMIN_KEY), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"]
    options += ["-o", f"UserKnownHostsFile={known_hosts}"]
    proc = subprocess.run(
        ["ssh", *options, f"labadmin@{address}", command],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# ---- what the README does not say yet ---------------------------------------------------------------------------


def test_a_server_whose_host_key_the_control_node_lacks_is_unreachable(lab, known_hosts, instance):
    """gpulab's ansible.cfg checks host keys: the control node must know the server's (ssh to it once, or
    ssh-keyscan) before the first run."""
    before = snapshot(instance)
    run = site(lab, known_hosts, "--check", "--diff")
    assert run.rc != 0 and run.unreachable == 1, run.text[-3000:]
    assert "Host key verification failed" in run, run.text[-3000:]
    assert snapshot(instance) == before


@pytest.fixture(scope="module")
def known_host(known_hosts, address):
    """The admin accepts the server's host key, as on the first `ssh -p 2222 labadmin@server`."""
    keys = subprocess.run(
        ["ssh-keyscan", "-p", str(SSH_PORT), "-t", "ed25519", address],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert f"[{address}]:{SSH_PORT} ssh-ed25519 " in keys, keys
    known_hosts.write_text(keys)
    return known_hosts


def test_without_the_sudo_password_the_run_stops_before_anything_changes(lab, known_hosts, known_host, instance):
    """labadmin's sudo asks for a password: Ansible must be given it (--ask-become-pass, or ansible_become_password
    in the inventory, vaulted)."""
    before = snapshot(instance)
    run = site(lab, known_hosts, "--check", "--diff")
    assert run.rc != 0 and run.failed == 1 and run.changed == 0, run.text[-3000:]
    assert "Missing sudo password" in run, run.text[-3000:]
    assert snapshot(instance) == before


@pytest.fixture(scope="module")
def sudo_lab(lab, known_host):
    """The sudo password for this server, in host_vars/<server>.yml (a lab keeps it in Ansible Vault)."""
    host_vars = lab / "host_vars"
    host_vars.mkdir(exist_ok=True)
    password = SUDO_PASSWORD.read_text().strip()
    write_yaml(host_vars / f"{SERVER}.yml", {"ansible_become_password": password})
    (host_vars / f"{SERVER}.yml").chmod(0o600)
    return lab


# ---- the README's step 3 ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def check_run(sudo_lab, known_hosts, instance):
    before = snapshot(instance)
    run = site(sudo_lab, known_hosts, "--check", "--diff")
    return run, before, snapshot(instance)


def test_check_diff_on_a_server_gpulab_has_never_seen_says_what_it_would_do(check_run):
    run, _, _ = check_run
    assert run.rc == 0 and run.failed == 0 and run.unreachable == 0, run.text[-4000:]
    said = "\n".join(line for line in run.raw.splitlines() if "heck mode" in line or "would" in line)
    # apt's own preview (the server has python3-apt, as a standard Debian install does)
    new_packages = re.search(
        r"Install the distribution's docker.io.*?NEW packages will be installed:(.*?)upgraded", run.raw, re.DOTALL
    )
    assert new_packages and "docker.io" in new_packages.group(1).split(), run.text[-4000:]
    assert '+  "live-restore": true' in run.raw, said  # --diff: daemon.json as role docker would write it
    assert f"Check mode: would change /etc/docker/daemon.json on {SERVER}: live-restore" in run, said
    deepo = f"Check mode: no Docker engine answers on {SERVER} yet, so nothing can be compared. A real run would put"
    assert f"{deepo} {IMAGE}:latest onto it." in run, said
    assert f"Check mode: no Docker engine answers on {SERVER} yet (role docker installs both)" in run, said
    assert "student1: would be started (container notebook-student1, port 7777 on 127.0.0.1" in run, said


def test_check_diff_changes_nothing_on_the_server(check_run):
    _, before, after = check_run
    assert after == before


@pytest.fixture(scope="module")
def first_run(check_run, sudo_lab, known_hosts):
    return site(sudo_lab, known_hosts)


def test_the_run_sets_the_server_up(first_run):
    assert first_run.rc == 0 and first_run.failed == 0, first_run.text[-4000:]
    assert first_run.changed > 0


@pytest.fixture(scope="module")
def second_run(first_run, sudo_lab, known_hosts):
    assert first_run.rc == 0, first_run.text[-4000:]
    return site(sudo_lab, known_hosts)


def test_the_second_run_changes_nothing(second_run):
    assert second_run.rc == 0 and second_run.failed == 0, second_run.text[-4000:]
    assert second_run.changed == 0, second_run.text[-6000:]


# ---- the server afterwards, over SSH -----------------------------------------------------------------------------


def test_docker_runs_and_the_admin_reaches_it_with_sudo(second_run, address, known_host):
    password = SUDO_PASSWORD.read_text().strip() + "\n"
    script = "systemctl is-active docker; systemctl is-enabled docker"
    script += "; docker ps --format '{{.Names}} {{.Image}} {{.Status}}'"
    out = ssh(address, f"sudo -S -p '' sh -c {shlex.quote(script)}", known_hosts=known_host, stdin=password)
    assert out.split("\n")[:2] == ["active", "enabled"], out
    assert re.search(rf"^notebook-student1 {IMAGE}:latest Up ", out, re.MULTILINE), out


def test_the_notebook_answers_on_127_0_0_1_with_the_token_only(second_run, address, known_host):
    def status(*args):
        command = "python3 - " + " ".join(["7777", *args])  # the client's source comes on stdin
        return json.loads(ssh(address, command, known_hosts=known_host, stdin=CLIENT.read_text()))

    assert status("--token", TOKEN) == {"status": 200}
    assert status() == {"status": 403}
    assert status("--token", "0" * 48) == {"status": 403}


@pytest.fixture(scope="module")
def sheet(second_run):
    return SHEET


def test_the_access_sheet_gives_the_servers_ssh_port_and_host(sheet, address):
    assert sheet.stat().st_mode & 0o777 == 0o600
    text = sheet.read_text()
    assert f"ssh: ssh -p {SSH_PORT} -L 7777:127.0.0.1:7777 student1@{address}\n" in text, text
    assert f"url: http://localhost:7777/?token={TOKEN}" in text, text


def test_the_student_reaches_the_notebook_with_the_sheets_command(sheet, known_host):
    command = re.search(r"^ssh: (.*)$", sheet.read_text(), re.MULTILINE).group(1)
    with sheet_tunnel(command, STUDENT_KEY, known_host) as local:
        assert Jupyter("127.0.0.1", local).status() == 403
        assert Jupyter("127.0.0.1", local, token=TOKEN).status() == 200
