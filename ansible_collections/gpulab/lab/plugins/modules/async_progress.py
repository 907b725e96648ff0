#!/usr/bin/python
# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""Documentation of the action gpulab.lab.async_progress (plugins/action/async_progress.py), which runs on the
controller and has no module code of its own: ansible-doc and ansible-test read an action's documentation here.

Why gpulab writes it: ansible.builtin.async_status answers once; waiting with `until` shows nothing but retries, and
an include that includes itself to poll again nests one include per round (about 720 for a 2-hour pull at 10 s).
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: async_progress
short_description: Wait for an async job, reporting its progress every few seconds
version_added: "0.1.0"
description:
  - Waits for a job that a task started with C(async) and C(poll) 0, asking its status (as
    M(ansible.builtin.async_status) does) every O(interval) seconds, and prints one progress line per round on the
    controller, read from the job's O(progress_file).
  - "For example C([gpu1] Pulling ufoym/deepo:all-py38-cu113: downloading, layers 3 of 21, 1843 of 6012 MiB, 140 s
    elapsed)."
  - One task however long the job runs, so the controller's memory and the play's task count stay flat.
  - Returns the job's own result when it ends (and removes the job's status file). A failed job does not fail this
    task; RV(job_failed) says so and RV(msg) says why, for the caller's own message.
options:
  jid:
    description: The job's id, C(ansible_job_id) of the task that started it.
    type: str
    required: true
  what:
    description: What the job does, the start of each progress line and of the failure message (C(Pulling IMAGE)).
    type: str
    required: true
  progress_file:
    description:
      - A JSON file on the server that the job rewrites as it goes, with any of C(phase), C(layers_done),
        C(layers_total), C(bytes_done), C(bytes_total). Empty - the lines say only how long the job has run.
    type: str
    default: ""
  interval:
    description: Seconds between two rounds (a round's own time counts; at least 0.2).
    type: float
    default: 10
  timeout:
    description:
      - The job's time limit (the C(async) of the task that started it). The wait gives up 120 seconds after it, for a
        job that no longer answers.
    type: float
    default: 7200
  started:
    description: When the job started (seconds since the epoch), for the elapsed time; default when the wait starts.
    type: float
extends_documentation_fragment:
  - gpulab.lab.attributes
attributes:
  check_mode:
    support: full
    details: Reads only; a job that check mode did not start has no id to wait for.
  diff_mode:
    support: none
author:
  - gpulab developers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Start pulling the image
  gpulab.lab.docker_image_pull_progress:
    name: ufoym/deepo
    tag: all-py38-cu113
    progress_file: /run/gpulab-pull.progress
  async: 7200
  poll: 0
  register: pull_job

- name: Wait for the pull, reporting layers and bytes done
  gpulab.lab.async_progress:
    jid: "{{ pull_job.ansible_job_id }}"
    what: Pulling ufoym/deepo:all-py38-cu113
    progress_file: /run/gpulab-pull.progress
    interval: 10
    timeout: 7200
  register: pull

- name: Stop when the pull failed
  ansible.builtin.fail:
    msg: "{{ pull.msg }}"
  when: pull.job_failed
"""

RETURN = r"""
job_failed:
  description: Whether the job failed; its own keys (RV(msg) among them) are returned beside this one.
  returned: always
  type: bool
msg:
  description: Why the job failed, after O(what) and the word failed; or the job's own message.
  returned: when the job failed or gave one
  type: str
polls:
  description: How many times the job's status was asked.
  returned: always
  type: int
reports:
  description: How many progress lines were printed.
  returned: always
  type: int
"""
