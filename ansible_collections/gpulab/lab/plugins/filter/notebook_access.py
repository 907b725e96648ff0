# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT
"""Filters of the notebook role about what the people get: the access sheet of a server (each student's ssh -L
command and URL with the token; it holds secrets, so the role writes it only in a task with no_log) and the summary
at the end of the play (no secret).

They read the plan (notebook_plan.py) and, for the sheet's tokens, notebook_users; they decide nothing.
tests/unit/test_notebook_access.py feeds them directly.
"""

from __future__ import annotations

from ansible_collections.gpulab.lab.plugins.filter.notebook_jupyter import entry_of
from ansible_collections.gpulab.lab.plugins.filter.notebook_server import is_wildcard


def _ssh_command(user, server, ssh_port):
    port = f"-p {ssh_port} " if ssh_port and int(ssh_port) != 22 else ""
    target = "127.0.0.1" if user["loopback"] or is_wildcard(user["bind_address"]) else user["bind_address"]
    target = f"[{target}]" if ":" in target else target
    return f"ssh {port}-L {user['local_port']}:{target}:{user['port']} {user['ssh_user']}@{server}"


def notebook_access_sheet(plan_users, users, server, ssh_port=22, host=""):
    """The access sheet of one server: per user the ssh -L command and the URL (with the token). Holds secrets."""
    lines = [
        f"# gpulab notebooks on {host or server}: how each student reaches theirs. Written by Ansible (role",
        "# notebook); it holds the notebooks' tokens: keep it private, give each student their own part only.",
        "# On the laptop: run the ssh command (it keeps running; add -N for no shell), then open the URL.",
        "",
    ]
    for user in sorted(plan_users, key=lambda u: u["name"]):
        if user["state"] == "absent":
            continue
        entry = entry_of(users, user["name"])
        url = f"http://localhost:{user['local_port']}/"
        if entry.get("token"):
            url += f"?token={entry['token']}"
        lines.append(f"[{user['name']}]")
        lines.append(f"ssh: {_ssh_command(user, server, ssh_port)}")
        lines.append(f"url: {url}")
        login = {"token": "the token in the URL", "none": "no login (only through the tunnel)"}.get(
            user["auth"], "the URL, then the notebook password (not written here)"
        )
        if user["auth"] == "token and password":
            login = "the token in the URL, or the notebook password"
        lines.append(f"login: {login}")
        lines.append(f"state: {user['state']}; container {user['container']}; GPUs {user['gpus']}")
        lines.append(f"files: {user['workdir']} on the server, {user['container_workdir']} in the notebook")
        if user.get("pending_update"):
            lines.append(f"update: {user['pending_update']}")
        lines.append("")
    return "\n".join(lines)


def notebook_summary(plan_users, server, ssh_port=22, sheet=""):
    """One line per user for the end of the play, without secrets."""
    lines = []
    for user in plan_users:
        if user["state"] == "absent":
            lines.append(f"{user['name']}: removed (container {user['container']}; the workdir is kept)")
            continue
        lines.append(
            f"{user['name']}: {user['state']}, port {user['port']}, GPUs {user['gpus']}, login by {user['auth']}; "
            f"{_ssh_command(user, server, ssh_port)} then http://localhost:{user['local_port']}/"
            + (f" (URL with token: {sheet})" if "token" in user["auth"] else "")
            + (f"; {user['pending_update']}" if user.get("pending_update") else "")
        )
    return lines


def notebook_applied(plan_users, notebooks):
    """The plan's users with what module notebook_containers found for each (an image update left pending)."""
    found = {n.get("name"): n for n in notebooks or [] if isinstance(n, dict)}
    users = []
    for planned in plan_users or []:
        user = dict(planned)
        pending = (found.get(user["name"]) or {}).get("pending_update")
        if pending:
            user["pending_update"] = pending
        users.append(user)
    return users


def notebook_preview(plan_users):
    """One line per user of what a real run would do, for check mode where no engine can be compared yet (no
    secret)."""
    lines = []
    for user in plan_users:
        if user["state"] == "absent":
            lines.append(f"{user['name']}: would be removed (container {user['container']}; the workdir is kept)")
            continue
        created = "" if user.get("workdir_exists") else " (created)"
        lines.append(
            f"{user['name']}: would be {user['state']} (container {user['container']}, port {user['port']} on "
            f"{user['bind_address']}, workdir {user['workdir']}{created}, GPUs {user['gpus']}, login by "
            f"{user['auth']}, image {user['image']})"
        )
    return lines


class FilterModule:
    def filters(self):
        return {
            "notebook_access_sheet": notebook_access_sheet,
            "notebook_summary": notebook_summary,
            "notebook_applied": notebook_applied,
            "notebook_preview": notebook_preview,
        }
