# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""gpulab's container backups: a content-addressed store on the server, and the backup and restore of a container.

Used by the modules container_backup and container_restore, and run on its own (without Ansible) by the systemd
timer of role backup (cli.py). One concern per file:
  common.py       the error, names, digests, backup ids and tags, the progress record
  streams.py      zstd and tar: BlobReader, TarReader, tar headers, TarOf
  store.py        the store: layout, lock, blob paths and indexes, manifests, retention
  blobs.py        writing blobs: BlobWriter, ChunkedLayerWriter (content-defined chunks of a layer)
  docker_save.py  docker save archives: their images (legacy and OCI layouts) and the checks of an archive file
                  (shared with docker_image_archive)
  ingest.py       a docker save stream's layers into the store (SaveIngest)
  overlay.py      an overlay2 upper directory as a layer tar, and the content-defined chunker
  settings.py     a container's run settings, secret variables left out
  mounts.py       bind mounts: which are archived, their backup and restore (tree.py; tar archives of older backups)
  tree.py         a work directory as content-defined chunks with a listing, read incrementally and consistently,
                  restored exactly; the stat cache of the writable layer's metadata walk
  sources.py      the readers of a container: upper dir, commit + save, export-flatten (one typed result)
  backup.py       BackupJob: which path, check mode, the run into the store, the manifest
  archive.py      format docker-archive: one docker load-able tar
  verify.py       every blob of a backup checked before a restore
  restore.py      RestoreJob and the docker load tar assembled from the blobs (LoadTar)
  options.py      the options of both modules, declared once: argument_spec and the command line
  module.py       the modules' shared run: result, notices, errors
  cli.py          the command line of the systemd timer
Helpers it shares with other modules are one level up: docker_api.py (the engine's client), files.py (programs, a
file's sha256, durable renames). Python's standard library only (3.8 or newer) and the zstd and tar programs (Debian
packages zstd, tar).
"""
