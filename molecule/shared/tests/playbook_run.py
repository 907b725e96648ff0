"""ansible-playbook runs against a molecule instance, for the scenarios' testinfra tests (not a test module itself).

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared" / "tests"))
    from playbook_run import PROJECT_DIR, gpu_servers_inventory, run_playbook

run_playbook(hostname, "gpulab.lab.deepo", {"deepo_image_tag": "x"}, "--check") runs the playbook with the
molecule inventory (and any extra inventories), colours off, and returns a Run: its return code, its raw and
whitespace-normalised output, and the host's recap figures; `"some words" in run` looks for words in the output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

PROJECT_DIR = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
# run_playbook(..., env=JSON_RESULTS): each task's result as JSON in the output, for tests that read a result's fields
JSON_RESULTS = {"ANSIBLE_CALLBACK_RESULT_FORMAT": "json"}


class Run:
    """One ansible-playbook run: return code, whitespace-normalised output, the host's recap."""

    def __init__(self, proc, hostname):
        self.rc = proc.returncode
        self.raw = proc.stdout + proc.stderr
        self.text = " ".join(self.raw.replace("\\n", " ").split())
        recap = re.search(
            rf"{re.escape(hostname)}\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", self.raw
        )
        assert recap, self.raw[-3000:]
        self.ok, self.changed, self.unreachable, self.failed = (int(n) for n in recap.groups())

    def __contains__(self, words):
        return " ".join(words.split()) in self.text


def collections_path():
    """Where ansible-playbook finds gpulab.lab (the project's ansible_collections/) before any other collection."""
    return os.pathsep.join([str(PROJECT_DIR), os.environ.get("ANSIBLE_COLLECTIONS_PATH", "~/.ansible/collections")])


def gpu_servers_inventory(path, hostname):
    """An inventory file that puts the instance in group gpu_servers (the plays' hosts). The plays say become: true;
    ansible connects as root through docker exec here (no sudo)."""
    Path(path).write_text(json.dumps({"gpu_servers": {"hosts": {hostname: {"ansible_become": False}}}}))
    return path


def run_playbook(hostname, playbook, extra_vars=None, *options, inventories=(), env=None, timeout=400):
    """Run a playbook against the molecule inventory (plus `inventories`); returns a Run. `playbook` is one of the
    collection's (gpulab.lab.deepo) or a file of the project (site.yml)."""
    playbook_bin = shutil.which("ansible-playbook", path=str(Path(sys.executable).parent)) or "ansible-playbook"
    command = [playbook_bin, "-i", os.environ["MOLECULE_INVENTORY_FILE"]]
    for inventory in inventories:
        command += ["-i", str(inventory)]
    command += list(options)
    if extra_vars:
        command += ["-e", json.dumps(extra_vars)]
    command.append(playbook if playbook.startswith("gpulab.lab.") else str(PROJECT_DIR / playbook))
    environment = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", **(env or {}))
    environment["ANSIBLE_COLLECTIONS_PATH"] = collections_path()
    proc = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout, check=False)
    return Run(proc, hostname)


def playbook_runner(hostname, playbook, folder, **defaults):
    """A scenario's fixture in one line: run(extra_vars, *options) runs `playbook` against the instance put in group
    gpu_servers (an inventory written in `folder`), with run_playbook's keyword arguments `defaults`."""
    groups = gpu_servers_inventory(Path(folder) / "gpu_servers.yml", hostname)

    def run(extra_vars=None, *options):
        return run_playbook(hostname, playbook, extra_vars, *options, inventories=[groups], **defaults)

    return run
