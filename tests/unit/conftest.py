"""Shared fixtures of the unit tests. gpulab's modules, module_utils and filters are the collection gpulab.lab in
ansible_collections/ of the project's root, which pyproject.toml puts on pytest's path: tests import them as
ansible_collections.gpulab.lab.plugins.<kind>.<name>, as Ansible does."""

import pytest
from ansible.module_utils import basic
from module_harness import ModuleExit, ModuleFail


@pytest.fixture
def capture_exit(monkeypatch):
    def exit_json(self, **kwargs):
        kwargs.setdefault("changed", False)
        raise ModuleExit(kwargs)

    def fail_json(self, msg, **kwargs):
        raise ModuleFail({**kwargs, "failed": True, "msg": msg})

    monkeypatch.setattr(basic.AnsibleModule, "exit_json", exit_json)
    monkeypatch.setattr(basic.AnsibleModule, "fail_json", fail_json)
