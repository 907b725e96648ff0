#!/usr/bin/python
# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""Pull an image from a registry (or through the engine's registry mirrors), writing its progress to a file.

Why gpulab writes its own module instead of using community.docker.docker_image_pull: that module returns only when
the pull has ended and shows nothing while a 10 GB deep-learning image comes down for many minutes; run with async,
it cannot be asked how far it is. This module reads the engine's pull message stream itself (POST /images/create) and
writes, at most once a second, the layers done, the layers in the image, and the bytes downloaded of the bytes known,
to a progress file that a role running it with async reports while it waits (roles/deepo/tasks/wait.yml). Like
community.docker's module it pulls only when the image is missing (pull: not_present) or always, and answers
changed only when the engine got a new image. It reads the engine's socket with no read timeout (the Docker SDK's
default of 60 s is a known trap for multi-GB pulls). Only Python's standard library is needed on the server.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: docker_image_pull_progress
short_description: Pull a Docker image, reporting layers and bytes done to a progress file while it runs
version_added: "0.1.0"
description:
  - Pulls O(name):O(tag) through the Docker engine, which uses its C(registry-mirrors) for Docker Hub images.
  - While the pull goes on, writes its progress as JSON to O(progress_file) at most once a second
    (C(phase), C(seconds), C(layers_done), C(layers_total), C(bytes_done), C(bytes_total)), for a role that runs it
    with C(async) and reports it. C(bytes_total) counts the layers whose size the registry has announced so far.
  - With O(pull=not_present) nothing is pulled when the engine has the image; with O(pull=always) the engine asks the
    registry and the result is changed only when the image's ID changed.
  - Credentials come from the C(auths) of the Docker client configuration O(config_path) (what C(docker login)
    writes); credential helpers (C(credsStore)) are not asked, and without an entry the pull is anonymous.
  - community.docker.docker_image_pull shows nothing while a pull runs; hence this module.
author:
  - gpulab developers (!UNKNOWN)
extends_documentation_fragment:
  - gpulab.lab.attributes
  - gpulab.lab.attributes.idempotent
  - gpulab.lab.docker
options:
  name:
    description: The image's repository, for example V(ufoym/deepo) or V(registry.example.org:5000/lab/deepo).
    type: str
    required: true
  tag:
    description: The tag.
    type: str
    default: latest
  pull:
    description: V(not_present) pulls only when the engine lacks the image; V(always) asks the registry every time.
    type: str
    choices: [always, not_present]
    default: not_present
  timeout:
    description: Seconds to wait for each message from the engine during the pull; V(0) waits for ever.
    type: int
    default: 0
  progress_file:
    description: File the progress is written to while the image is pulled (JSON); removed when the pull ends.
    type: path
  config_path:
    description: The Docker client configuration with the registry credentials.
    type: path
    default: ~/.docker/config.json
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  idempotent:
    support: full
"""

EXAMPLES = r"""
---
- name: Pull the deepo image, reporting progress to a file
  docker_image_pull_progress:
    name: ufoym/deepo
    tag: all-py38-cu113
    progress_file: /run/gpulab-pull.progress
  async: 7200
  poll: 0
"""

RETURN = r"""
---
image_id:
  description: The image's ID after the pull (or before it, when nothing was pulled).
  type: str
  returned: success
  sample: sha256:0715030e2e6b...
previous_id:
  description: The image's ID before the pull; null when the engine did not have it.
  type: str
  returned: success
layers_total:
  description: Layers of the image the engine reported (0 when nothing was pulled).
  type: int
  returned: success
layers_downloaded:
  description: Layers that came from the registry; the others were already in the engine.
  type: int
  returned: success
bytes_downloaded:
  description: Bytes of layers downloaded.
  type: int
  returned: success
status:
  description: The engine's last status message, for example C(Status, Downloaded newer image for ...).
  type: str
  returned: success
seconds:
  description: Seconds the pull took (0 when nothing was pulled).
  type: float
  returned: success
"""

import base64
import json
import os
import time
import traceback

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.gpulab.lab.plugins.module_utils import docker_api as api

DONE = ("Pull complete", "Already exists")


class PullProgress:
    """Follows the engine's pull messages: one entry per layer ID, with its download figures and state.

    The engine sends, per layer, "Pulling fs layer" / "Waiting", then "Downloading" with progressDetail
    {current, total}, "Verifying Checksum", "Download complete", "Extracting" with progressDetail, and last
    "Pull complete"; a layer the engine has is reported once as "Already exists". Messages about the image as a whole
    ("Pulling from ...", "Digest: ...", "Status: ...") carry no layer ID or the tag as their ID.
    """

    def __init__(self, tag):
        self.tag = tag
        self.layers = {}
        self.status = ""

    def feed(self, msg):
        if not isinstance(msg, dict):
            return
        status = str(msg.get("status", ""))
        layer = msg.get("id")
        if not layer or layer == self.tag or status.startswith("Pulling from"):
            if status:
                self.status = status
            return
        entry = self.layers.setdefault(layer, {"current": 0, "total": 0, "state": "waiting", "downloaded": False})
        detail = msg.get("progressDetail") or {}
        if status == "Downloading":
            entry["current"] = int(detail.get("current") or entry["current"])
            entry["total"] = int(detail.get("total") or entry["total"])
            entry["state"] = "downloading"
            entry["downloaded"] = True
        elif status in ("Download complete", "Verifying Checksum"):
            entry["current"] = entry["total"] or entry["current"]
            entry["state"] = "downloaded"
            entry["downloaded"] = True
        elif status == "Extracting":
            entry["state"] = "extracting"
        elif status in DONE:
            entry["state"] = "done"
            entry["current"] = entry["total"] or entry["current"]

    def figures(self):
        layers = self.layers.values()
        return {
            "layers_done": sum(1 for e in layers if e["state"] == "done"),
            "layers_total": len(self.layers),
            "bytes_done": sum(e["current"] for e in layers if e["downloaded"]),
            "bytes_total": sum(e["total"] for e in layers if e["downloaded"]),
        }

    def phase(self):
        states = {e["state"] for e in self.layers.values()}
        if "downloading" in states or "waiting" in states:
            return "downloading"
        if "extracting" in states or "downloaded" in states:
            return "extracting"
        return "pulling" if not self.layers else "finishing"


def registry_of(name):
    """The registry host of a repository name, as Docker reads it (docker.io when the first part is no host)."""
    first, _slash, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def registry_auth(config_path, registry):
    """The X-Registry-Auth header value for registry from the client configuration's auths, or None."""
    path = config_path or ""  # the option is of type path: Ansible has expanded ~ already
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            auths = json.load(f).get("auths") or {}
    except (OSError, ValueError, AttributeError):
        return None
    keys = [registry, "https://" + registry, "http://" + registry]
    if registry == "docker.io":
        keys += ["https://index.docker.io/v1/", "index.docker.io"]
    for key in keys:
        entry = auths.get(key) or {}
        if entry.get("auth"):
            user, _colon, password = base64.b64decode(entry["auth"]).decode().partition(":")
            creds = {"username": user, "password": password, "serveraddress": key}
            return base64.urlsafe_b64encode(json.dumps(creds).encode()).decode()
        if entry.get("identitytoken"):
            creds = {"identitytoken": entry["identitytoken"], "serveraddress": key}
            return base64.urlsafe_b64encode(json.dumps(creds).encode()).decode()
    return None


def run_module(module):
    p = module.params
    ref = f"{p['name']}:{p['tag']}"
    engine = api.Engine(p["docker_host"], p["timeout"] or None)
    before = engine.image(ref)
    result = {
        "changed": False,
        "image_id": before["Id"] if before else None,
        "previous_id": before["Id"] if before else None,
        "layers_total": 0,
        "layers_downloaded": 0,
        "bytes_downloaded": 0,
        "status": "",
        "seconds": 0.0,
    }
    if before and p["pull"] == "not_present":
        result["status"] = f"{ref} is in the engine; not pulled (pull: not_present)"
        return result
    if module.check_mode:
        # Without asking the registry, an image that is missing will be pulled; one that is there may get newer.
        result["changed"] = before is None
        result["status"] = f"would pull {ref}"
        return result

    headers = {}
    auth = registry_auth(p["config_path"], registry_of(p["name"]))
    if auth:
        headers["X-Registry-Auth"] = auth
    tracker = PullProgress(p["tag"])
    progress = api.ProgressFile(p["progress_file"])
    started = time.monotonic()
    path = api.query("/images/create", fromImage=p["name"], tag=p["tag"])
    try:
        for msg in engine.stream_messages("POST", path, headers=headers):
            tracker.feed(msg)
            progress.write(tracker.phase(), **tracker.figures())
    finally:
        progress.remove()
    figures = tracker.figures()
    after = engine.image(ref)
    if after is None:
        raise api.DockerApiError(f"the engine ended the pull of {ref} without error but has no such image")
    result.update(
        changed=not before or before["Id"] != after["Id"],
        image_id=after["Id"],
        layers_total=figures["layers_total"],
        layers_downloaded=sum(1 for e in tracker.layers.values() if e["downloaded"]),
        bytes_downloaded=figures["bytes_done"],
        status=tracker.status,
        seconds=round(time.monotonic() - started, 1),
    )
    return result


def main():
    module = AnsibleModule(
        argument_spec={
            "name": {"type": "str", "required": True},
            "tag": {"type": "str", "default": "latest"},
            "pull": {"type": "str", "choices": ["always", "not_present"], "default": "not_present"},
            "docker_host": {"type": "str", "default": "unix:///var/run/docker.sock"},
            "timeout": {"type": "int", "default": 0},
            "progress_file": {"type": "path"},
            "config_path": {"type": "path", "default": "~/.docker/config.json"},
        },
        supports_check_mode=True,
    )
    ref = f"{module.params['name']}:{module.params['tag']}"
    try:
        result = run_module(module)
    except api.DockerApiError as e:
        module.fail_json(msg=f"Pulling {ref} failed: {e}")
    except Exception as e:
        module.fail_json(msg=f"Unexpected error pulling {ref}: {e}", exception=traceback.format_exc())
    module.exit_json(**result)


if __name__ == "__main__":
    main()
