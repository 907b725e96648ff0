# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""How gpulab's modules reach the Docker engine, described once (plugins/module_utils/docker_api.py is the client)."""


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  docker_host:
    description:
      - The engine's API socket, C(unix:///path) or a plain path. The module talks to it directly (no Docker SDK
        on the server), with no read timeout unless the module's own O(timeout) says otherwise.
    type: str
    default: unix:///var/run/docker.sock
"""
