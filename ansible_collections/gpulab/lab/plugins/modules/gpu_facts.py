#!/usr/bin/python
# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""Report a host's NVIDIA GPUs, driver and CUDA version as Ansible facts, read from nvidia-smi.

Why gpulab writes its own module: nothing in ansible-core or community.general reports NVIDIA GPUs.
ansible-core's setup facts list no GPUs, and community.general has no module for nvidia-smi, so the
roles would otherwise have to scrape `nvidia-smi` text with `command` + `register` in every play.
This module reads `nvidia-smi -q -x` (stable, documented XML) once and returns typed facts, and turns
the two classic failures (driver/library version mismatch, driver not loaded) into messages that say
what to do.

With `processes: true` it also reads what the GPUs are doing (memory used, utilization, the processes that hold
memory and the container each runs in: module_utils/gpu_usage.py), for role status.

The parsing lives in pure functions (`parse_nvidia_smi_xml`, `parse_compute_capabilities`,
`classify_failure`, and gpu_usage's) so unit tests can feed them real nvidia-smi outputs. The module runs on the
target with the standard library and ansible.module_utils only, on Python 3.8 or newer.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: gpu_facts
short_description: Gather facts about the host's NVIDIA GPUs from nvidia-smi
version_added: "0.1.0"
description:
  - Runs C(nvidia-smi -q -x) on the target and returns the NVIDIA driver version, the highest CUDA
    version that driver supports, and one entry per GPU (name, UUID, memory, PCI bus id, compute
    capability, MIG mode).
  - nvidia-smi's XML carries no compute capability, so the module also runs
    C(nvidia-smi --query-gpu=index,compute_cap --format=csv,noheader). Older drivers (the 470 branch,
    for instance) do not know that field; then RV(ansible_facts.gpulab_gpu.gpus[].compute_capability) is V(null).
  - A host without nvidia-smi is not an error. The module returns RV(ansible_facts.gpulab_gpu.present=false),
    since no NVIDIA driver is installed.
  - If nvidia-smi exists but fails, the module fails with a message that names the cause and the remedy,
    for instance a reboot after a driver upgrade (C(Driver/library version mismatch)) or a kernel module
    that is not loaded.
  - >-
    With O(processes=true) it also runs C(nvidia-smi --query-gpu=...) and
    C(nvidia-smi --query-compute-apps=pid,used_memory,gpu_uuid --format=csv,noheader,nounits), and adds each GPU's
    memory in use and utilization, and RV(ansible_facts.gpulab_gpu.processes), every process holding GPU memory with
    the Docker container it runs in (from C(/proc/<pid>/cgroup)).
  - No module in ansible-core or community.general reports NVIDIA GPUs, hence this one.
author:
  - gpulab developers (!UNKNOWN)
options:
  nvidia_smi_path:
    description:
      - Path of the nvidia-smi program.
      - If not set, nvidia-smi is looked up on E(PATH) and in C(/sbin), C(/usr/sbin) and C(/usr/local/sbin).
      - If set, it must be an executable file; otherwise the module fails.
    type: path
  timeout:
    description:
      - Seconds to wait for each nvidia-smi command before giving up.
      - A GPU that has fallen off the bus can make nvidia-smi hang for minutes.
    type: int
    default: 30
  processes:
    description:
      - Also report memory in use and utilization per GPU, and the processes that hold GPU memory.
      - Mapping a process to its container reads C(/proc/<pid>/cgroup), which needs root for other users' processes.
    type: bool
    default: false
extends_documentation_fragment:
  - gpulab.lab.attributes
  - gpulab.lab.attributes.idempotent
  - gpulab.lab.attributes.facts
  - gpulab.lab.attributes.read_only
attributes:
  facts:
    support: full
notes:
  - Needs no root privileges; nvidia-smi's queries work for any user (but see O(processes)).
seealso:
  - name: nvidia-smi documentation
    description: NVIDIA System Management Interface, the source of these facts.
    link: https://docs.nvidia.com/deploy/nvidia-smi/index.html
"""

EXAMPLES = r"""
---
- name: Gather NVIDIA GPU facts
  gpu_facts:

- name: Show the GPUs
  ansible.builtin.debug:
    msg: "{{ gpulab_gpu.count }} GPU(s), driver {{ gpulab_gpu.driver_version }}, CUDA {{ gpulab_gpu.cuda_version }}"
  when: gpulab_gpu.present

- name: Require a driver that supports CUDA 12.8 or newer
  ansible.builtin.assert:
    that:
      - gpulab_gpu.cuda_major > 12 or (gpulab_gpu.cuda_major == 12 and gpulab_gpu.cuda_minor >= 8)
    fail_msg: "Driver {{ gpulab_gpu.driver_version }} supports CUDA {{ gpulab_gpu.cuda_version }} only"
  when: gpulab_gpu.present

- name: Who holds GPU memory
  gpu_facts:
    processes: true
  register: gpu_now

- name: Use an nvidia-smi outside PATH and allow it more time
  gpu_facts:
    nvidia_smi_path: /usr/local/nvidia/bin/nvidia-smi
    timeout: 120
  register: gpu_result
"""

RETURN = r"""
---
msg:
  description: Why no GPU facts were found. Set only when the host has no nvidia-smi.
  returned: when no nvidia-smi was found
  type: str
  sample: No nvidia-smi was found on this host, so no NVIDIA driver is installed.
gpu:
  description: The same dictionary as RV(ansible_facts.gpulab_gpu), for use with C(register).
  returned: always
  type: dict
ansible_facts:
  description: Facts to add to the host's facts.
  returned: always
  type: dict
  contains:
    gpulab_gpu:
      description: NVIDIA GPUs and driver of the host.
      returned: always
      type: dict
      contains:
        present:
          description: Whether the host has at least one NVIDIA GPU that nvidia-smi reports.
          returned: always
          type: bool
          sample: true
        count:
          description: Number of GPUs.
          returned: always
          type: int
          sample: 1
        driver_version:
          description: NVIDIA driver version. V(null) when no nvidia-smi was found.
          returned: always
          type: str
          sample: "580.159.04"
        cuda_version:
          description:
            - Highest CUDA version the driver supports (not an installed CUDA toolkit).
            - V(null) when no nvidia-smi was found or nvidia-smi reports none.
          returned: always
          type: str
          sample: "13.0"
        cuda_major:
          description: Major part of RV(ansible_facts.gpulab_gpu.cuda_version), or V(null).
          returned: always
          type: int
          sample: 13
        cuda_minor:
          description: Minor part of RV(ansible_facts.gpulab_gpu.cuda_version), or V(null).
          returned: always
          type: int
          sample: 0
        nvidia_smi_path:
          description: The nvidia-smi that was run, or V(null) when none was found.
          returned: always
          type: str
          sample: /usr/bin/nvidia-smi
        gpus:
          description: One entry per GPU, in nvidia-smi's order (which is PCI bus order).
          returned: always
          type: list
          elements: dict
          contains:
            index:
              description: nvidia-smi's GPU index (as in C(nvidia-smi -i) and C(CUDA_VISIBLE_DEVICES) with PCI order).
              type: int
              sample: 0
            minor_number:
              description: Minor number of the GPU's device node (C(/dev/nvidiaN)), or V(null) where not reported.
              type: int
              sample: 0
            uuid:
              description: GPU UUID.
              type: str
              sample: GPU-00000000-1111-2222-3333-444444444444
            name:
              description: Product name.
              type: str
              sample: NVIDIA H200
            memory_total_mib:
              description: Total framebuffer memory in MiB, or V(null) where not reported.
              type: int
              sample: 143771
            pci_bus_id:
              description: PCI bus id as domain:bus:device.function.
              type: str
              sample: "00000000:00:06.0"
            compute_capability:
              description:
                - CUDA compute capability as C(major.minor), or V(null) when the driver cannot report it.
              type: str
              sample: "9.0"
            mig_mode:
              description: Current MIG mode, as nvidia-smi reports it.
              type: str
              sample: Disabled
              choices: [Enabled, Disabled, N/A]
            mig_devices:
              description: Number of MIG devices on this GPU.
              type: int
              sample: 0
            memory_used_mib:
              description: Framebuffer memory in use, in MiB. Only with O(processes=true).
              type: int
              sample: 1034
            utilization_pct:
              description: GPU utilization in percent over nvidia-smi's last sample period. Only with O(processes=true).
              type: int
              sample: 37
        processes:
          description: The processes that hold GPU memory, as nvidia-smi lists them. Only with O(processes=true).
          returned: when processes is true
          type: list
          elements: dict
          contains:
            pid:
              description: The process ID as the host sees it.
              type: int
              sample: 48213
            used_memory_mib:
              description: GPU memory the process holds, in MiB; V(null) where nvidia-smi cannot say.
              type: int
              sample: 1034
            gpu_uuid:
              description: UUID of the GPU (or MIG device).
              type: str
              sample: GPU-00000000-1111-2222-3333-444444444444
            gpu_index:
              description: nvidia-smi's index of that GPU, or V(null) for a MIG device.
              type: int
              sample: 0
            container_id:
              description: Full ID of the Docker container the process runs in, or V(null) for a process outside one.
              type: str
              sample: 3f1c0d6b8f0c4e0fa7d2c1b5e9a8f7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a1f0
"""

# Ansible modules keep their imports below DOCUMENTATION, EXAMPLES and RETURN.
import os
import re
import subprocess
import xml.etree.ElementTree as ET

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.gpulab.lab.plugins.module_utils import gpu_usage

QUERY_XML_ARGS = ["-q", "-x"]
QUERY_COMPUTE_CAP_ARGS = ["--query-gpu=index,compute_cap", "--format=csv,noheader"]

NO_NVIDIA_SMI_MSG = "No nvidia-smi was found on this host, so no NVIDIA driver is installed."

_MIB_RE = re.compile(r"^(\d+)\s*MiB$")
_VERSION_RE = re.compile(r"^(\d+)\.(\d+)")
_COMPUTE_CAP_RE = re.compile(r"^\d+\.\d+$")
_NVML_VERSION_RE = re.compile(r"NVML library version:\s*(\S+)")


class NvidiaSmiOutputError(ValueError):
    """nvidia-smi printed something that is not the XML report it should print."""


def empty_facts():
    """Facts for a host without NVIDIA GPUs."""
    return {
        "present": False,
        "count": 0,
        "driver_version": None,
        "cuda_version": None,
        "cuda_major": None,
        "cuda_minor": None,
        "gpus": [],
        "nvidia_smi_path": None,
    }


def _text(element, path):
    """Stripped text of the sub-element at path; None when it is missing, empty or N/A."""
    found = element.find(path)
    if found is None or found.text is None:
        return None
    value = found.text.strip()
    if not value or value == "N/A":
        return None
    return value


def _int_or_none(value):
    if value is None or not value.isdigit():
        return None
    return int(value)


def _mib(value):
    if value is None:
        return None
    match = _MIB_RE.match(value)
    return int(match.group(1)) if match else None


def _parse_gpu(index, gpu):
    mig_mode = _text(gpu, "mig_mode/current_mig") or "N/A"
    return {
        "index": index,
        "minor_number": _int_or_none(_text(gpu, "minor_number")),
        "uuid": _text(gpu, "uuid"),
        "name": _text(gpu, "product_name"),
        "memory_total_mib": _mib(_text(gpu, "fb_memory_usage/total")),
        "pci_bus_id": _text(gpu, "pci/pci_bus_id") or gpu.get("id"),
        # nvidia-smi -q -x has no compute capability element (checked on driver 580); see
        # parse_compute_capabilities for where it comes from.
        "compute_capability": None,
        "mig_mode": mig_mode,
        "mig_devices": len(gpu.findall("mig_devices/mig_device")),
    }


def parse_nvidia_smi_xml(text):
    """Parse the output of `nvidia-smi -q -x` into the gpulab_gpu facts dictionary.

    Raises NvidiaSmiOutputError when text is not nvidia-smi's XML report.
    """
    if "<!ENTITY" in text:
        # nvidia-smi declares no entities; refuse them rather than let the parser expand any.
        raise NvidiaSmiOutputError("nvidia-smi -q -x printed XML with entity declarations, which nvidia-smi never does")
    try:
        # The input is the local nvidia-smi's output, not remote data; the DOCTYPE names an external DTD,
        # which ElementTree (expat) never fetches or resolves, and entity declarations were refused above.
        root = ET.fromstring(text)  # noqa: S314
    except ET.ParseError as exc:
        raise NvidiaSmiOutputError(f"nvidia-smi -q -x printed output that is not valid XML ({exc})") from exc
    if root.tag != "nvidia_smi_log":
        raise NvidiaSmiOutputError(f"nvidia-smi -q -x printed XML whose root is <{root.tag}>, not <nvidia_smi_log>")

    facts = empty_facts()
    facts["driver_version"] = _text(root, "driver_version")
    cuda_version = _text(root, "cuda_version")
    match = _VERSION_RE.match(cuda_version or "")
    if match:
        facts["cuda_version"] = cuda_version
        facts["cuda_major"] = int(match.group(1))
        facts["cuda_minor"] = int(match.group(2))
    facts["gpus"] = [_parse_gpu(index, gpu) for index, gpu in enumerate(root.findall("gpu"))]
    facts["count"] = len(facts["gpus"])
    facts["present"] = facts["count"] > 0
    return facts


def parse_compute_capabilities(text):
    """Map GPU index to compute capability from `nvidia-smi --query-gpu=index,...,compute_cap --format=csv,noheader`.

    The first column is the index and the last one the compute capability, so longer queries work too.
    Lines that do not fit (an error message, N/A) are skipped.
    """
    capabilities = {}
    for line in text.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) < 2 or not fields[0].isdigit() or not _COMPUTE_CAP_RE.match(fields[-1]):
            continue
        capabilities[int(fields[0])] = fields[-1]
    return capabilities


def merge_compute_capabilities(facts, capabilities):
    """Fill in compute_capability of the GPUs in facts from a parse_compute_capabilities result."""
    for gpu in facts["gpus"]:
        if gpu["compute_capability"] is None:
            gpu["compute_capability"] = capabilities.get(gpu["index"])
    return facts


def classify_failure(rc, out, err):
    """Explain a failed nvidia-smi run: what happened and what to do."""
    output = f"{out or ''}\n{err or ''}"
    if "Driver/library version mismatch" in output:
        match = _NVML_VERSION_RE.search(output)
        library = f" (NVML library version {match.group(1)})" if match else ""
        return (
            f"nvidia-smi failed with rc {rc}: Driver/library version mismatch. The loaded nvidia kernel module "
            f"and the user-space NVIDIA libraries{library} are different versions, which usually happens after "
            "a driver upgrade without a reboot. Reboot the server (or stop everything that uses the GPU and "
            "reload the nvidia kernel modules: modprobe -r nvidia_uvm nvidia_drm nvidia_modeset nvidia && "
            "modprobe nvidia). Compare cat /proc/driver/nvidia/version with the installed driver package."
        )
    if "couldn't communicate with the NVIDIA driver" in output:
        return (
            f"nvidia-smi failed with rc {rc}: it couldn't communicate with the NVIDIA driver, so the NVIDIA "
            "kernel driver is not loaded. Check lsmod | grep nvidia; check that the driver's kernel module was "
            "built for the running kernel (dkms status against uname -r, or install the linux-headers for it); "
            "if Secure Boot is enabled (mokutil --sb-state), the module must be signed with an enrolled key or it "
            "is refused (see dmesg); otherwise reinstall the NVIDIA driver and reboot."
        )
    if "No devices were found" in output:
        return (
            f"nvidia-smi failed with rc {rc}: No devices were found. The NVIDIA driver is loaded but sees no GPU: "
            "check lspci -d 10de: and dmesg for NVRM errors (a GPU that has fallen off the bus, or one the driver "
            "does not support)."
        )
    return f"nvidia-smi failed with rc {rc}. stdout: {(out or '').strip()!r}; stderr: {(err or '').strip()!r}"


def merge_usage(facts, usage, apps, proc="/proc"):
    """Add memory_used_mib and utilization_pct to facts' GPUs and facts["processes"], from gpu_usage's parses of
    the usage and compute-apps queries (usage: GpuUsage list, apps: parse_compute_apps result)."""
    by_index = {gpu.index: gpu for gpu in usage}
    for gpu in facts["gpus"]:
        found = by_index.get(gpu["index"])
        gpu["memory_used_mib"] = found.memory_used_mib if found else None
        gpu["utilization_pct"] = found.utilization_pct if found else None
    facts["processes"] = gpu_usage.as_dicts(gpu_usage.processes(apps, usage, proc))
    return facts


def run_nvidia_smi(path, args, timeout):
    """Run nvidia-smi; returns (rc, stdout, stderr). AnsibleModule.run_command has no timeout, hence subprocess."""
    result = subprocess.run(
        [path, *args],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )
    return result.returncode, result.stdout, result.stderr


def _add_compute_capabilities(path, timeout, facts):
    if any(gpu["compute_capability"] is None for gpu in facts["gpus"]):
        # Older drivers (470.x) do not know the compute_cap field; the capability then stays None.
        try:
            rc, out, _err = run_nvidia_smi(path, QUERY_COMPUTE_CAP_ARGS, timeout)
        except (subprocess.TimeoutExpired, OSError):
            rc, out = None, ""
        if rc == 0:
            merge_compute_capabilities(facts, parse_compute_capabilities(out))


def _add_usage(module, path, timeout, facts):
    """Run the usage and compute-apps queries and merge them into facts (processes: true)."""
    outputs = []
    for args in (gpu_usage.QUERY_GPU_ARGS, gpu_usage.QUERY_APPS_ARGS):
        query = " ".join([path, *args])
        try:
            rc, out, err = run_nvidia_smi(path, args, timeout)
        except (subprocess.TimeoutExpired, OSError) as exc:
            module.fail_json(msg=f"{query} did not finish within {timeout} seconds or could not run: {exc}")
        if rc != 0:
            module.fail_json(msg=f"{query}: {classify_failure(rc, out, err)}", rc=rc, stdout=out, stderr=err)
        outputs.append(out)
    merge_usage(facts, gpu_usage.parse_gpu_usage(outputs[0]), gpu_usage.parse_compute_apps(outputs[1]))


def _exit_with_facts(module, facts, **extra):
    if module.params["processes"]:
        facts.setdefault("processes", [])  # no GPU, no process holding GPU memory
    module.exit_json(changed=False, gpu=facts, ansible_facts={"gpulab_gpu": facts}, **extra)


def main():
    module = AnsibleModule(
        argument_spec={
            "nvidia_smi_path": {"type": "path"},
            "timeout": {"type": "int", "default": 30},
            "processes": {"type": "bool", "default": False},
        },
        supports_check_mode=True,
    )
    timeout = module.params["timeout"]
    if timeout <= 0:
        module.fail_json(msg=f"timeout must be a positive number of seconds, not {timeout}")

    path = module.params["nvidia_smi_path"]
    if path:
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            module.fail_json(msg=f"nvidia_smi_path {path} is not an executable file")
    else:
        path = module.get_bin_path("nvidia-smi")
    if not path:
        _exit_with_facts(module, empty_facts(), msg=NO_NVIDIA_SMI_MSG)

    command = " ".join([path, *QUERY_XML_ARGS])
    try:
        rc, out, err = run_nvidia_smi(path, QUERY_XML_ARGS, timeout)
    except subprocess.TimeoutExpired:
        module.fail_json(
            msg=f"{command} did not finish within {timeout} seconds and was stopped. A hung GPU or driver "
            "(see dmesg for NVRM or Xid errors) makes nvidia-smi hang; raise the timeout option if the host is "
            "merely slow.",
            nvidia_smi_path=path,
        )
    except OSError as exc:
        module.fail_json(msg=f"Could not run {command}: {exc}", nvidia_smi_path=path)
    if rc != 0:
        module.fail_json(msg=classify_failure(rc, out, err), rc=rc, stdout=out, stderr=err, nvidia_smi_path=path)

    try:
        facts = parse_nvidia_smi_xml(out)
    except NvidiaSmiOutputError as exc:
        module.fail_json(msg=f"{exc}. Run {command} by hand to see what it prints.", stdout=out, stderr=err)
    facts["nvidia_smi_path"] = path

    _add_compute_capabilities(path, timeout, facts)

    if module.params["processes"] and facts["present"]:
        _add_usage(module, path, timeout, facts)
    _exit_with_facts(module, facts)


if __name__ == "__main__":
    main()
