# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT
"""Filter deepo_pick_tag: the newest ufoym/deepo tag that the host's NVIDIA driver can run.

Pure Python (no Ansible in the decision), so tests/unit/test_deepo_tags.py feeds it gpu_facts' real output.
The tag table lives in the role's vars/main.yml (__deepo_tag_table); Docker Hub is never asked at run time.
"""

from __future__ import annotations

from ansible.errors import AnsibleFilterError


class NoTagFits(ValueError):
    """No tag of the table suits the host; the message names the driver's CUDA version and the candidates."""


def _version(text):
    """'11.3' -> (11, 3); None or '' -> None (a CPU tag)."""
    if text in (None, ""):
        return None
    parts = str(text).split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0


def driver_cuda(gpu):
    """The highest CUDA version the driver supports, from gpu_facts' result (or its gpulab_gpu fact); None: no GPU."""
    if not gpu or not gpu.get("present"):
        return None
    if gpu.get("cuda_major") is not None:
        return int(gpu["cuda_major"]), int(gpu.get("cuda_minor") or 0)
    return _version(gpu.get("cuda_version"))


def pick_tag(table, gpu, framework="all", jupyter=False):
    """Return the tag of `table` to use on a host whose gpu_facts are `gpu`.

    table: list of {tag, framework, jupyter, cuda}; cuda is "X.Y", or null for a CPU tag.
    With a GPU: the entry of this framework and jupyter choice with the highest cuda <= the driver's.
    Without a GPU: the CPU entry. NoTagFits when none matches.
    """
    candidates = [
        row for row in table if row.get("framework") == framework and bool(row.get("jupyter", False)) == bool(jupyter)
    ]
    kind = f"framework {framework}{' with Jupyter' if jupyter else ''}"
    if not candidates:
        frameworks = sorted({row.get("framework") for row in table})
        raise NoTagFits(f"the deepo tag table has no tag for {kind}; it knows the frameworks {', '.join(frameworks)}")
    have = driver_cuda(gpu)
    if have is None:
        cpu = [row for row in candidates if _version(row.get("cuda")) is None]
        if not cpu:
            raise NoTagFits(f"the host has no NVIDIA GPU and the deepo tag table has no CPU tag for {kind}")
        return cpu[0]["tag"]
    gpu_rows = [row for row in candidates if _version(row.get("cuda")) is not None]
    fitting = [row for row in gpu_rows if _version(row["cuda"]) <= have]
    if not fitting:
        listed = ", ".join(f"{row['tag']} (CUDA {row['cuda']})" for row in gpu_rows) or "none"
        raise NoTagFits(
            f"the NVIDIA driver supports CUDA up to {have[0]}.{have[1]}, and no deepo tag for {kind} needs so little: "
            f"candidates {listed}. Upgrade the NVIDIA driver, or set deepo_image_tag to a tag of your choice"
        )
    return max(fitting, key=lambda row: _version(row["cuda"]))["tag"]


def deepo_pick_tag(table, gpu, framework="all", jupyter=False):
    """{tag, error}: the role asserts that error is empty, so a misfit fails with its own message, not a traceback."""
    if not isinstance(table, list):
        raise AnsibleFilterError("deepo_pick_tag expects the tag table (a list of {tag, framework, jupyter, cuda})")
    try:
        return {"tag": pick_tag(table, gpu, framework, jupyter), "error": ""}
    except NoTagFits as e:
        return {"tag": "", "error": f"deepo_image_tag is auto, but {e}."}


class FilterModule:
    def filters(self):
        return {"deepo_pick_tag": deepo_pick_tag}
