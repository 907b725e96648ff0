# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""The `attributes` every gpulab module declares, described once: a module names the fragment and sets only each
attribute's `support` (and `details` where it has some), as ansible.builtin's action_common_attributes does.

    extends_documentation_fragment:
      - gpulab.lab.attributes
      - gpulab.lab.attributes.idempotent      # modules that say whether a second run changes nothing
      - gpulab.lab.attributes.facts           # modules that return ansible_facts
      - gpulab.lab.attributes.read_only       # modules that only read: check mode full, no diff, idempotent
"""


class ModuleDocFragment:
    DOCUMENTATION = r"""
options: {}
attributes:
  check_mode:
    description: Can run in check mode and return changed status prediction without modifying target.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check mode), when in diff mode.
"""

    IDEMPOTENT = r"""
options: {}
attributes:
  idempotent:
    description:
      - When run twice in a row outside check mode, with the same arguments, the second invocation indicates no change.
      - This assumes that the system controlled or queried by the module has not changed in a relevant way.
"""

    FACTS = r"""
options: {}
attributes:
  facts:
    description: Action returns an C(ansible_facts) dictionary that will update existing host facts.
"""

    READ_ONLY = r"""
options: {}
attributes:
  check_mode:
    support: full
    details:
      - This action does not modify state.
  diff_mode:
    support: none
  idempotent:
    support: full
"""
