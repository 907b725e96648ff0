# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""The students' notebook containers of one server, applied in one run (module notebook_containers).

One concern per file:
  desired.py  what gpulab wants of one student's container (from the role's plan): the engine's create body, the
              hash of the settings gpulab sets (a label), and a readable summary for the play and --diff
  folders.py  the student's folders and Jupyter config files (owners, modes, content), check-mode aware
  images.py   the images a student's environment lives on: carry-over (commit, or flattened by the backup package's
              guard), rebase (the student's layers on a new lab image, from the safety backup) and their clean-up
  apply.py    per student: what changes and why, the safety backup, the recreate that keeps the old container until
              the new one runs, the wait for Jupyter; the report of the run
Python's standard library only, the engine through module_utils/docker_api.py; the backup package
(module_utils/backup/) is used, never copied.
"""
