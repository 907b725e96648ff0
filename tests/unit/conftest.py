"""Make gpulab's own modules importable by the unit tests, the way ansible.cfg wires them for Ansible."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for sub in ("library", "module_utils"):
    path = str(ROOT / sub)
    if path not in sys.path:
        sys.path.insert(0, path)
