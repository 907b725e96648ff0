# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT
"""Action gpulab.lab.async_progress: wait for an async job (a task started with `async` and `poll: 0`) and report its
progress from the controller every `interval` seconds, in one task however long the job runs.

Each round asks the job's status (ansible.builtin.async_status's module) and reads the job's progress file (slurp's
module), then prints one line; nothing is kept from one round to the next, so the controller's memory and the play's
task count stay the same for a two-hour pull as for a short one (an include that includes itself to poll again adds
tasks, and memory, every round). The job's own result comes back as this task's result, with job_failed saying
whether the job failed, for the caller's message. Documentation: plugins/modules/async_progress.py.
"""

from __future__ import annotations

import base64
import json
import time

from ansible.plugins.action import ActionBase
from ansible.utils.display import Display

display = Display()

ARGUMENT_SPEC = {
    "jid": {"type": "str", "required": True},
    "what": {"type": "str", "required": True},
    "progress_file": {"type": "str", "default": ""},
    "interval": {"type": "float", "default": 10.0},
    "timeout": {"type": "float", "default": 7200.0},
    "started": {"type": "float"},
}
# The async wrapper ends a job at its own time limit (the task's async); this is how much longer the wait goes on
# before it gives up on a job that no longer answers (a server that rebooted, a wiped async folder).
GRACE_SECONDS = 120
# Keys of the async bookkeeping that are not the job's result.
ASYNC_KEYS = ("started", "finished", "results_file", "ansible_job_id", "_ansible_suppress_tmpdir_delete")
MIB = 1048576


def progress_line(what, progress, elapsed):
    """'Pulling x: downloading, layers 3 of 21, 1843 of 6012 MiB, 140 s elapsed' from a progress file's fields."""
    line = f"{what}: {progress.get('phase') or 'starting'}"
    if progress.get("layers_total") is not None:
        line += f", layers {progress.get('layers_done', 0)} of {progress['layers_total']}"
    if progress.get("bytes_done") is not None:
        total = progress.get("bytes_total") or 0
        line += f", {int(progress['bytes_done'] // MIB)}" + (f" of {int(total // MIB)}" if total > 0 else "") + " MiB"
    return f"{line}, {int(elapsed)} s elapsed"


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _supports_check_mode = True
    _supports_async = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        _validation, args = self.validate_argument_spec(argument_spec=ARGUMENT_SPEC)
        host = (task_vars or {}).get("inventory_hostname", "")
        started = args["started"] or time.time()
        deadline = started + args["timeout"] + GRACE_SECONDS
        interval = max(args["interval"], 0.2)
        async_dir = self._remote_expand_user(self.get_shell_option("async_dir", default="~/.ansible_async"))
        status_args = {"jid": args["jid"], "_async_dir": async_dir}
        polls = reports = 0
        next_round = time.monotonic()
        try:
            while True:
                status = self._module("ansible.legacy.async_status", status_args, task_vars)
                polls += 1
                if status.get("finished"):
                    break
                if time.time() > deadline:
                    return {
                        **result,
                        "failed": True,
                        "msg": f"{args['what']}: the job {args['jid']} did not end within {int(args['timeout'])} s "
                        f"and {GRACE_SECONDS} s more",
                        "polls": polls,
                        "reports": reports,
                    }
                # Rounds start every interval (a round's own time is part of it), or at once when they take longer.
                next_round += interval
                time.sleep(max(0.0, next_round - time.monotonic()))
                line = progress_line(args["what"], self._progress(args, task_vars), time.time() - started)
                display.display(f"[{host}] {line}")
                reports += 1
            self._module("ansible.legacy.async_status", {**status_args, "mode": "cleanup"}, task_vars)
        finally:
            self._remove_tmp_path(self._connection._shell.tmpdir)
        job = {key: value for key, value in status.items() if key not in ASYNC_KEYS}
        job_failed = bool(job.pop("failed", False))
        if job_failed:
            job["msg"] = f"{args['what']} failed: {job.get('msg') or 'the job gave no reason'}"
        return {**result, **job, "failed": False, "job_failed": job_failed, "polls": polls, "reports": reports}

    def _module(self, name, module_args, task_vars):
        return self._execute_module(module_name=name, module_args=module_args, task_vars=task_vars)

    def _progress(self, args, task_vars):
        """The job's progress file as a dict; {} while there is none (or it is being rewritten)."""
        if not args["progress_file"]:
            return {}
        found = self._module("ansible.legacy.slurp", {"src": args["progress_file"]}, task_vars)
        try:
            progress = json.loads(base64.b64decode(found.get("content") or b""))
        except ValueError:
            return {}
        return progress if isinstance(progress, dict) else {}
