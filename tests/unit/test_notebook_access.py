"""Tests of what the people get (plugins/filter/notebook_access.py): the access sheet of a server and the summary at
the end of the play.
"""

import importlib

from notebook_cases import (
    PASSWORD,
    TOKEN,
    plan,
    users,
)

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


def test_the_summary_holds_no_secret():
    planned = plan([*users(), {"name": "old", "state": "absent"}])["users"]
    lines = nb.notebook_summary(planned, "gpu01", 22, "~/.gpulab/access/gpu01.txt")
    text = "\n".join(lines)
    assert TOKEN not in text and PASSWORD not in text
    assert lines[0] == "old: removed (container notebook-old; the workdir is kept)"
    assert "student1: started, port 7777, GPUs 0, login by token; ssh -L 7777:127.0.0.1:7777 student1@gpu01" in text
    assert "(URL with token: ~/.gpulab/access/gpu01.txt)" in text
