# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""What container_backup and container_restore share as Ansible modules: a job run for the module, its result
returned with its notices (also shown as warnings), and its errors as fail_json with a message the user can act on.

Takes the module object from its caller and imports nothing of Ansible, so the package stays standard-library only.
"""

from __future__ import annotations

import traceback

from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import BackupError, os_error_text
from ansible_collections.gpulab.lab.plugins.module_utils.docker_api import DockerApiError


def run_job(module, doing, call):
    """exit_json with call()'s result; fail_json with the message of a BackupError or DockerApiError, an OSError's
    reason with its path (and on a full disk the space free there), or the traceback of anything else. doing: the
    verb of the error's message ("backing up")."""
    container = module.params["container"]
    try:
        result = call()
    except (BackupError, DockerApiError) as e:
        module.fail_json(msg=str(e), container=container)
    except OSError as e:
        module.fail_json(msg=f"Error {doing} {container}: {os_error_text(e)}", container=container)
    except Exception as e:
        module.fail_json(msg=f"Unexpected error {doing} {container}: {e}", exception=traceback.format_exc())
    # Shown as Ansible warnings, and returned as notices (a module's own "warnings" key is deprecated in ansible-core).
    notices = result.pop("warnings", [])
    for notice in notices:
        module.warn(notice)
    module.exit_json(notices=notices, **result)
