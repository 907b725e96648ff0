"""Make gpulab's own modules importable by the unit tests, the way ansible.cfg wires them for Ansible."""

import sys
from pathlib import Path

import ansible.module_utils
import pytest
from ansible.module_utils import basic

ROOT = Path(__file__).resolve().parents[2]
for sub in ("library", "module_utils"):
    path = str(ROOT / sub)
    if path not in sys.path:
        sys.path.insert(0, path)
# gpulab's module_utils, importable as ansible.module_utils.<name> as Ansible ships them to the server.
if str(ROOT / "module_utils") not in ansible.module_utils.__path__:
    ansible.module_utils.__path__.append(str(ROOT / "module_utils"))


# Imported after the path set-up above.
from module_harness import ModuleExit, ModuleFail  # noqa: E402


@pytest.fixture
def capture_exit(monkeypatch):
    def exit_json(self, **kwargs):
        kwargs.setdefault("changed", False)
        raise ModuleExit(kwargs)

    def fail_json(self, msg, **kwargs):
        raise ModuleFail({**kwargs, "failed": True, "msg": msg})

    monkeypatch.setattr(basic.AnsibleModule, "exit_json", exit_json)
    monkeypatch.setattr(basic.AnsibleModule, "fail_json", fail_json)
