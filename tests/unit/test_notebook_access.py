"""Tests of what the people get (plugins/filter/notebook_access.py): the access sheet of a server, the summary at the
end of the play and check mode's preview; and the role's access tasks run by ansible-playbook, for the SSH host and
port the sheet names.
"""

import importlib
import json
import subprocess
import sys
from pathlib import Path

from notebook_cases import PASSWORD, ROOT, TOKEN, plan, users

nb = importlib.import_module("ansible_collections.gpulab.lab.plugins.filter.notebook_access")


# ---- what the people get -------------------------------------------------------------------------------------


def test_the_access_sheet():
    planned = plan()["users"]
    planned[1]["local_port"] = 8888
    sheet = nb.notebook_access_sheet(planned, users(), "gpu01.lab.example.org", 22, "gpu01")
    assert "ssh: ssh -L 7777:127.0.0.1:7777 student1@gpu01.lab.example.org\n" in sheet
    assert f"url: http://localhost:7777/?token={TOKEN}\n" in sheet
    assert "ssh: ssh -L 8888:127.0.0.1:7778 student2@gpu01.lab.example.org\n" in sheet
    assert "url: http://localhost:8888/\n" in sheet
    assert PASSWORD not in sheet
    assert "ssh -p 2222 -L" in nb.notebook_access_sheet(planned, users(), "gpu01", 2222)


def test_the_access_sheet_leaves_out_removed_users_and_uses_the_bind_address():
    entries = [{**users()[1], "ssh_user": "s2"}, {"name": "old", "state": "absent"}]
    planned = plan(entries, bind_address="10.0.0.5")["users"]
    sheet = nb.notebook_access_sheet(planned, entries, "gpu01")
    assert "[old]" not in sheet
    assert "ssh: ssh -L 7778:10.0.0.5:7778 s2@gpu01" in sheet


def test_a_pending_image_update_is_in_the_sheet_and_the_summary():
    pending = "image update pending: the notebook runs on lab:1 as it was; to take it, set image_policy: rebase"
    planned = nb.notebook_applied(plan()["users"], [{"name": "student1", "pending_update": pending}, {"x": 1}])
    assert planned[0]["pending_update"] == pending and "pending_update" not in planned[1]
    sheet = nb.notebook_access_sheet(planned, users(), "gpu01")
    assert sheet.split("[student2]")[0].endswith(f"update: {pending}\n\n")
    assert "update:" not in sheet.split("[student2]")[1]
    summary = nb.notebook_summary(planned, "gpu01")
    assert summary[0].endswith(f"; {pending}") and pending not in summary[1]


def test_the_summary_holds_no_secret():
    planned = plan([*users(), {"name": "old", "state": "absent"}])["users"]
    lines = nb.notebook_summary(planned, "gpu01", 22, "~/.gpulab/access/gpu01.txt")
    text = "\n".join(lines)
    assert TOKEN not in text and PASSWORD not in text
    assert lines[0] == "old: removed (container notebook-old; the workdir is kept)"
    assert "student1: started, port 7777, GPUs 0, login by token; ssh -L 7777:127.0.0.1:7777 student1@gpu01" in text
    assert "(URL with token: ~/.gpulab/access/gpu01.txt)" in text


def test_check_mode_without_an_engine_says_what_a_real_run_would_do():
    planned = plan([*users(), {"name": "old", "state": "absent"}])["users"]
    lines = nb.notebook_preview(planned)
    assert lines[0] == "old: would be removed (container notebook-old; the workdir is kept)"
    assert lines[1] == (
        "student1: would be started (container notebook-student1, port 7777 on 127.0.0.1, workdir "
        "/srv/notebooks/student1 (created), GPUs 0, login by token, image gpulab-test/dl-notebook:latest)"
    )
    assert "port 7778 on 127.0.0.1, workdir /srv/notebooks/student2 (created), GPUs none, login by password" in lines[2]
    assert TOKEN not in "\n".join(lines) and PASSWORD not in "\n".join(lines)


# ---- the role's access tasks, run by Ansible on this machine ------------------------------------------------


def run_access_tasks(tmp_path, host_vars):
    """roles/notebook/tasks/access.yml with the role's defaults, for a host of an inventory with host_vars (local
    connection: the sheet is written on the control node anyway); returns (the sheet, the play's output with its
    whitespace normalised)."""
    planned = plan()["users"]
    playbook = tmp_path / "access.yml"
    playbook.write_text(
        "- hosts: gpu01\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.include_role:\n        name: gpulab.lab.notebook\n        tasks_from: access.yml\n"
    )
    inventory = tmp_path / "inventory.json"
    host = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable, **host_vars}
    inventory.write_text(json.dumps({"all": {"hosts": {"gpu01": host}}}))
    extra = {"__notebook_plan": {"users": planned, "errors": []}, "notebook_users": users()}
    extra["notebook_access_dir"] = str(tmp_path / "access")
    command = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory), str(playbook)]
    proc = subprocess.run(
        [*command, "-e", json.dumps(extra)], cwd=ROOT, capture_output=True, text=True, check=False, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return (tmp_path / "access" / "gpu01.txt").read_text(), " ".join(proc.stdout.split())


def test_the_sheet_gives_the_ssh_host_and_port_ansible_reaches_the_server_on(tmp_path):
    sheet, output = run_access_tasks(tmp_path, {"ansible_host": "gpu01.lab.example.org", "ansible_port": 2222})
    assert "ssh: ssh -p 2222 -L 7777:127.0.0.1:7777 student1@gpu01.lab.example.org\n" in sheet
    assert "ssh -p 2222 -L 7777:127.0.0.1:7777 student1@gpu01.lab.example.org then" in output
    assert TOKEN not in output


def test_the_admins_ssh_host_and_port_win(tmp_path):
    host_vars = {"ansible_host": "10.0.0.7", "ansible_port": 2222, "notebook_ssh_host": "gpu01.lab.example.org"}
    sheet, _ = run_access_tasks(tmp_path, {**host_vars, "notebook_ssh_port": 22})
    assert "ssh: ssh -L 7777:127.0.0.1:7777 student1@gpu01.lab.example.org\n" in sheet
    sheet, _ = run_access_tasks(tmp_path, {"ansible_host": "10.0.0.7"})  # no ansible_port: SSH's own 22
    assert "ssh: ssh -L 7777:127.0.0.1:7777 student1@10.0.0.7\n" in sheet
