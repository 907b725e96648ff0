# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""The layers of a `docker save` stream (GET /images/<id>/get) into the store, as blobs (SaveIngest).

Reads the stream once, in chunks, never holding a layer in memory; which member is which image part comes from the
archive reader (docker_save.image_entries). Layers the store has are read through without being written again.
Talks to no engine (the caller opens the stream) and writes no manifest.
"""

from __future__ import annotations

import collections
import hashlib
import json
import posixpath
import tarfile
import zlib
from typing import NamedTuple

from ansible_collections.gpulab.lab.plugins.module_utils.backup.blobs import BlobWriter
from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import (
    DEFAULT_LEVEL,
    DIGEST_RE,
    BackupError,
    sha256_of,
)
from ansible_collections.gpulab.lab.plugins.module_utils.backup.docker_save import SMALL_FILE, image_entries
from ansible_collections.gpulab.lab.plugins.module_utils.backup.streams import TarReader, clean_name


class GuessedWrong(Exception):
    """A layer skipped because its size matched a stored layer turned out to be another one: read again, hashing all."""


class SavedImage(NamedTuple):
    """An image read from a save stream: its config (bytes) and its layer entries in image order (manifest entries,
    with "new": written by this stream, and "guessed": taken by its size)."""

    config: bytes
    layers: list


class SaveIngest:
    """Stores the layers of a `docker save` stream (legacy or OCI layout) as blobs; returns the config and layers.

    known: digest -> blob entry of the blobs the store has (Store.blob_index()); stored: diff_id -> layer entry of
    the layers it has (Store.layer_index(); by default, each blob of known as a layer of its own). expected: the
    image's diff_ids from GET /images/<id>/json (RootFS.Layers), or None. A legacy stream names its layers by folder,
    not by digest, and in the order of those names, not of the layers: a layer.tar whose size is that of exactly one
    expected layer already in the store is read through without being hashed or written (guess_by_size); the manifest
    at the end of the stream then confirms every guess by position, and a wrong guess raises GuessedWrong (the caller
    reads again, hashing all). Every layer that is written is hashed, and must have the digest the config gives it.
    """

    def __init__(
        self, store, known, *, stored=None, expected=None, level=DEFAULT_LEVEL, guess_by_size=True, progress=None
    ):
        self.store = store
        self.known = known
        if stored is None:
            stored = {d: {"diff_id": d, "size": b["size"], "blobs": [b]} for d, b in known.items()}
        self.stored = stored
        self.expected = list(expected or [])
        self.level = level
        self.guess_by_size = guess_by_size
        self.progress = progress
        self.stored_before = set(stored)
        self.met = collections.Counter()  # layers guessed so far in this stream
        self.files = {}  # small members, kept in memory: name -> bytes
        self.links = {}  # name -> name it links to
        self.layers = {}  # member name -> layer entry
        self.bytes_written = 0
        self.bytes_discarded = 0
        self.reader = None

    def _tick(self, force=False):
        if self.progress and self.reader:
            self.progress.update(force, bytes_read=self.reader.bytes_read, bytes_written=self.bytes_written)

    def read(self, stream):
        """Read the whole stream; returns (config bytes, [layer entries in image order])."""
        reader = self.reader = TarReader(stream, what="the docker save stream")
        for member in reader.members():
            name = member.name
            if member.type == tarfile.SYMTYPE:
                self.links[name] = posixpath.normpath(posixpath.join(posixpath.dirname(name), member.linkname))
            elif member.type == tarfile.LNKTYPE:
                self.links[name] = clean_name(member.linkname)
            elif not member.isfile():
                continue
            elif name.endswith("/layer.tar"):
                self.layers[name] = self._legacy_layer(reader, member)
            elif name.startswith("blobs/sha256/"):
                self._oci_blob(reader, member)
            elif member.size <= SMALL_FILE:
                self.files[name] = b"".join(reader.data())
            self._tick()
        return self._finish()

    # layers as they come

    def _legacy_layer(self, reader, member):
        guess = self._guess(member.size)
        if guess:
            for _block in reader.data():
                self._tick()
            return self._known_layer(guess, member.size, guessed=True)
        return self._store(reader.data(), member.name)

    def _guess(self, size):
        """The one expected layer, stored before this stream and not yet met in it, that has this size; or None."""
        if not self.guess_by_size:
            return None
        candidates = {
            d
            for d in self.expected
            if d in self.stored_before and self.stored[d]["size"] == size and self.met[d] < self.expected.count(d)
        }
        if len(candidates) != 1:
            return None
        guess = candidates.pop()
        self.met[guess] += 1
        return guess

    def _known_layer(self, digest, size, guessed=False):
        layer = self.stored[digest]
        if layer["size"] != size:
            raise BackupError(f"layer {digest} has {size} bytes in the save stream, but {layer['size']} in the store")
        blobs = [dict(b) for b in layer["blobs"]]
        return {"diff_id": digest, "size": size, "blobs": blobs, "new": False, "guessed": guessed}

    def _oci_blob(self, reader, member):
        digest = "sha256:" + member.name.rsplit("/", 1)[-1]
        if not DIGEST_RE.match(digest):
            return
        if digest in self.stored:
            for _block in reader.data():
                self._tick()
            self.layers[member.name] = self._known_layer(digest, member.size)
        elif digest in self.expected:
            self.layers[member.name] = self._store(reader.data(), member.name, expect=digest)
        elif member.size <= SMALL_FILE:
            self.files[member.name] = b"".join(reader.data())
        else:
            self.layers[member.name] = self._store_blob(reader.data(), member.name, digest)

    def _store_blob(self, chunks, name, digest):
        """An OCI blob that is not a known layer: a gzip-compressed layer (Docker's containerd image store keeps them
        as pulled) is stored uncompressed-content-addressed; anything else must hash to its name."""
        chunks = iter(chunks)
        first = next(chunks, b"")
        rest = _chain([first], chunks)
        if first[:2] == b"\x1f\x8b":
            return self._store_gzip(rest, name, digest)
        return self._store(rest, name, expect=digest)

    def _store_gzip(self, chunks, name, digest):
        compressed = hashlib.sha256()
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)

        def plain():
            for block in chunks:
                compressed.update(block)
                yield inflate.decompress(block)
            yield inflate.flush()

        layer = self._store(plain(), name)
        if "sha256:" + compressed.hexdigest() != digest:
            raise BackupError(f"{name} in the save stream does not have the digest its name says")
        layer["compressed_digest"] = digest
        return layer

    def _store(self, chunks, name, expect=None):
        with BlobWriter(self.store, self.level) as writer:
            for block in chunks:
                if block:
                    writer.write(block)
                    self._tick()
            self._tick(force=True)  # zstd may still work a while on what it has
            blob = writer.finish()
            digest = blob["digest"]
            if expect and digest != expect:
                raise BackupError(f"{name} in the save stream has digest {digest}, not {expect}: the stream is damaged")
            if digest in self.stored:  # already stored (its size matched several layers, so it could not be guessed)
                self.bytes_discarded += blob["stored_size"]
                return self._known_layer(digest, blob["size"])
            kept, written = self.store.keep(writer, blob, self.known)
        self.bytes_written += written
        self.stored[digest] = {"diff_id": digest, "size": blob["size"], "blobs": [kept]}
        return {"diff_id": digest, "size": blob["size"], "blobs": [kept], "new": True, "guessed": False}

    # the end: which layer is which

    def _resolve(self, name):
        name = clean_name(name)
        for _link in range(16):
            if name not in self.links:
                return name
            name = self.links[name]
        raise BackupError(f"the save stream has a link loop at {name}")

    def _finish(self):
        try:
            entries = image_entries(self.files, "the save stream")
            if entries is None:
                raise BackupError("the engine's save stream is no docker save archive: no manifest.json, no index.json")
            if not entries:
                raise BackupError("the save stream's OCI index names no image manifest")
            config_name, layer_names = entries[0].config, entries[0].layers
            config_bytes = self.files.get(self._resolve(config_name))
            if config_bytes is None:
                raise BackupError(f"the save stream lacks the image config {config_name}")
            diff_ids = json.loads(config_bytes)["rootfs"]["diff_ids"]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise BackupError(f"the save stream has a manifest or config gpulab cannot read: {e!r}") from e
        if config_name.startswith("blobs/sha256/") and sha256_of(config_bytes) != "sha256:" + config_name[13:]:
            raise BackupError(f"the image config {config_name} in the save stream does not match its digest")
        if len(layer_names) != len(diff_ids):
            raise BackupError(f"the save stream lists {len(layer_names)} layers, its config {len(diff_ids)}")
        layers = [self._layer_at(i, name, diff_ids[i]) for i, name in enumerate(layer_names)]
        if self.expected and diff_ids != self.expected:
            raise BackupError("the save stream holds other layers than the engine reported for the image")
        return SavedImage(config_bytes, layers)

    def _layer_at(self, position, name, diff_id):
        path = self._resolve(name)
        layer = self.layers.get(path)
        if layer is None and path in self.files:  # a small OCI layer blob, kept in memory until now
            data = self.files.pop(path)
            digest = "sha256:" + path.rsplit("/", 1)[-1]
            layer = self.layers[path] = self._store_blob([data], path, digest)
        if layer is None:
            raise BackupError(f"the save stream names layer {name}, which it does not hold")
        if layer["diff_id"] != diff_id:
            if layer.get("guessed"):
                raise GuessedWrong(path)
            raise BackupError(f"layer {position + 1} ({name}) has digest {layer['diff_id']}, the config says {diff_id}")
        return layer


def _chain(*iterables):
    for iterable in iterables:
        yield from iterable
