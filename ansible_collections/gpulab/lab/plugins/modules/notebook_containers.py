#!/usr/bin/python
# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""Every student's Jupyter notebook container of one server in one module run: folders, Jupyter config files, the
container (create, recreate with the student's environment carried over, restart on a config change, stop, remove),
image updates by policy, a safety backup before a container is stopped for good or removed, and the wait for Jupyter.

Why gpulab writes its own module: role notebook ran about six module runs per student (file three times, copy twice,
community.docker.docker_container, uri), so the time of a run that changed nothing grew with the students (50 s for
one, 175 s for thirty); here one run does all students, comparing one label per container. And
community.docker.docker_container recreates a container from its image when a setting changes, throwing away what
the student installed inside it: carry-over needs a commit of the stopped container before the recreate (no Ansible
module does `docker commit`), and a safety backup of the backup package (module_utils/backup/) before it.
The code lives in module_utils/notebook/ (apply.py says what happens per student).
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: notebook_containers
short_description: The students' Jupyter notebook containers of one server, in one run, keeping their environments
version_added: "0.2.0"
description:
  - Takes role notebook's plan (O(users), from the filter C(gpulab.lab.notebook_plan) and C(notebook_commands); it
    holds no secret) and the Jupyter config files with the secrets (O(configs)), and for every student
    creates the workdir and Jupyter config files (owners and modes as role notebook always made them) and the
    container.
  - "A container's settings (command, user, environment, labels, port, mounts, GPUs, IPC mode, limits, restart
    policy) are hashed into the label C(io.gpulab.notebook.settings): a run compares one label per container.
    A container whose hash differs (or that has none: made by an older gpulab) is recreated with its environment
    carried over: a safety backup first (when the backup store exists), the container stopped, its writable layer
    committed into C(gpulab-carry/<container>:<stamp>) (deleted files stay deleted), the new container created on it
    with the new settings; the old one is renamed aside until the new one runs, and comes back if that fails. Its
    running kernels stop; the result says so per student. When the image would reach O(flatten_threshold) layers,
    the backup package's flatten guard exports it as one layer instead."
  - "A new lab image (another image ID than the environment was made from, a new tag or the same tag loaded again)
    follows the student's image policy (O(image_policy), or C(image_policy) of the user): V(keep) (the container
    stays on its image; RV(notebooks[].pending_update) says how to take the update), V(rebase) (the student's layers
    from the safety backup put on the new image; packages built against the old image may need reinstalling),
    V(replace) (a fresh container on the new image; the safety backup holds the old environment for restore.yml).
    V(rebase) and V(replace) need the safety backup: without one the container stays, with a message."
  - A changed Jupyter config restarts a running container (Jupyter reads it at start). C(state=absent) removes the
    container after a safety backup (the workdir stays); its Jupyter config folder goes.
  - Waits, all at once at the end, for Jupyter's C(/api/status) of every container the run started.
  - A student whose change fails (its safety backup, the engine) keeps the container as it was; the others go on;
    the module then fails, naming each failure, with every student's result.
author:
  - gpulab developers (!UNKNOWN)
options:
  users:
    description:
      - The plan's users (C(notebook_plan) and C(notebook_commands) of role notebook), in the order to apply them.
    type: list
    elements: dict
    required: true
  configs:
    description: Per student's name, the content of the Jupyter config file with the token or password hash.
    type: dict
    default: {}
  log_filter:
    description: The content of the Jupyter config that hides tokens in Jupyter's log (role notebook's file).
    type: str
    required: true
  config_dir:
    description: The folder (root only, mode 0700) of the students' Jupyter config folders.
    type: path
    default: /etc/gpulab/notebook
  restart_policy:
    description: Docker's restart policy of the containers.
    type: str
    choices: ["no", on-failure, always, unless-stopped]
    default: unless-stopped
  image_policy:
    description: What a new lab image does to a student's container, for users that name no C(image_policy).
    type: str
    choices: [keep, rebase, replace]
    default: keep
  safety_backup:
    description: Back up a container before it is recreated or removed, when O(safety_backup_store) exists.
    type: bool
    default: true
  safety_backup_store:
    description: The backup store (role backup's C(backup_store_dir)); no safety backup when it does not exist.
    type: path
    default: /var/backups/gpulab
  safety_backup_keep_last:
    description: The store's retention for the container (role backup's C(backup_keep_last)).
    type: int
    default: 3
  flatten_threshold:
    description: Layer count at which a carried-over image is flattened into one layer (the backup package's guard).
    type: int
    default: 100
  wait_timeout:
    description: Seconds to wait for the started notebooks to answer; V(0) does not wait.
    type: int
    default: 120
  timeout:
    description: Seconds to wait for each read from the engine; V(0) waits for ever (a commit of a big layer).
    type: int
    default: 0
extends_documentation_fragment:
  - gpulab.lab.attributes
  - gpulab.lab.attributes.idempotent
  - gpulab.lab.docker
attributes:
  check_mode:
    support: full
    details: Says per student what would change, and whether its environment would be carried over.
  diff_mode:
    support: full
    details: The settings before and after of each container that would be created or recreated (no secret).
  idempotent:
    support: full
notes:
  - Needs root on the server (the students' files, the engine's socket, the overlay2 upper directories).
"""

EXAMPLES = r"""
- name: Apply every student's notebook
  gpulab.lab.notebook_containers:
    users: "{{ __notebook_plan.users }}"
    configs: "{{ notebook_users | gpulab.lab.notebook_jupyter_configs(__notebook_plan.users, inventory_hostname) }}"
    log_filter: "{{ lookup('ansible.builtin.file', 'gpulab_jupyter_config.py', rstrip=false) }}"
    image_policy: keep
"""

RETURN = r"""
notebooks:
  description: Per student, what the run did (or would do in check mode).
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The student.
      type: str
    action:
      description: >-
        unchanged, created, recreated, rebased, replaced, started, restarted, stopped, removed, left as it was.
      type: str
    settings_changed:
      description: The settings that changed (port, gpus, memory, env, ...).
      type: list
      elements: str
    kernels_restarted:
      description: Whether the student's running kernels were stopped.
      type: bool
    carried_over:
      description: Whether the environment inside the container was carried over.
      type: bool
    safety_backup:
      description: "The safety backup: id, store, seconds, path_taken; null when none was taken."
      type: dict
    pending_update:
      description: An image update that the policy keep left pending, and how to take it.
      type: str
    messages:
      description: What to tell about this student.
      type: list
      elements: str
    error:
      description: Why this student's change failed (its container was left as it was).
      type: str
messages:
  description: Every student's messages, one line each.
  returned: always
  type: list
  elements: str
"""

import traceback

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.gpulab.lab.plugins.module_utils import docker_api as api
from ansible_collections.gpulab.lab.plugins.module_utils.notebook.apply import Options, Run


def main():
    module = AnsibleModule(
        argument_spec={
            "users": {"type": "list", "elements": "dict", "required": True},
            "configs": {"type": "dict", "default": {}, "no_log": True},
            "log_filter": {"type": "str", "required": True},
            "config_dir": {"type": "path", "default": "/etc/gpulab/notebook"},
            "restart_policy": {
                "type": "str",
                "choices": ["no", "on-failure", "always", "unless-stopped"],
                "default": "unless-stopped",
            },
            "image_policy": {"type": "str", "choices": ["keep", "rebase", "replace"], "default": "keep"},
            "safety_backup": {"type": "bool", "default": True},
            "safety_backup_store": {"type": "path", "default": "/var/backups/gpulab"},
            "safety_backup_keep_last": {"type": "int", "default": 3},
            "flatten_threshold": {"type": "int", "default": 100},
            "wait_timeout": {"type": "int", "default": 120},
            "timeout": {"type": "int", "default": 0},
            "docker_host": {"type": "str", "default": "unix:///var/run/docker.sock"},
        },
        supports_check_mode=True,
    )
    p = module.params
    options = Options(
        configs=p["configs"],
        log_filter=p["log_filter"],
        config_dir=p["config_dir"],
        restart_policy=p["restart_policy"],
        image_policy=p["image_policy"],
        safety_backup=p["safety_backup"],
        safety_backup_store=p["safety_backup_store"],
        safety_backup_keep_last=p["safety_backup_keep_last"],
        flatten_threshold=p["flatten_threshold"],
        wait_timeout=p["wait_timeout"],
        check_mode=module.check_mode,
    )
    try:
        outcomes = Run(api.Engine(p["docker_host"], p["timeout"] or None), options).apply(p["users"])
    except (api.DockerApiError, OSError) as e:
        module.fail_json(msg=f"the notebooks could not be applied: {e}")
    except Exception as e:
        module.fail_json(msg=f"Unexpected error applying the notebooks: {e}", exception=traceback.format_exc())
    result = {
        "changed": any(o.changed for o in outcomes),
        "notebooks": [o.as_dict() for o in outcomes],
        "messages": [line for o in outcomes for line in o.messages],
    }
    if module._diff:
        changed = [o for o in outcomes if o.before or o.after]
        result["diff"] = {
            "before": "".join(f"{o.name}: {o.before or '(no container)'}\n" for o in changed),
            "after": "".join(f"{o.name}: {o.after}\n" for o in changed),
        }
    errors = [o.error for o in outcomes if o.error]
    if errors:
        module.fail_json(msg="; ".join(errors), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
