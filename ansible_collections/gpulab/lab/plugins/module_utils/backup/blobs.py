# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""Writing blobs into the store: one stream compressed by zstd into a temporary file (BlobWriter), and a layer tar cut
into content-defined chunks, each written once and compressed in batches (ChunkedLayerWriter).

A blob is named by the sha256 of its content and renamed into blobs/ only once it is complete and durable; what is
not committed is removed. Never writes a manifest, never removes a committed blob (retention is the store's).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import tempfile
import threading

from ansible_collections.gpulab.lab.plugins.module_utils.backup.common import (
    CHUNK,
    DEFAULT_LEVEL,
    BackupError,
    os_error_text,
    sha256_of,
)
from ansible_collections.gpulab.lab.plugins.module_utils.backup.overlay import MemberChunker
from ansible_collections.gpulab.lab.plugins.module_utils.backup.streams import zstd_level, zstd_program
from ansible_collections.gpulab.lab.plugins.module_utils.files import (
    file_sha256,
    fsync_dir,
    grow_pipe,
    sync_filesystem,
    write_all,
)

SYNC_EVERY = 64 * 1024 * 1024  # a blob being written is flushed to disk every so many bytes: no long fsync at the end


class BlobWriter:
    """Compresses the bytes given to write() into a temporary file of the store with zstd, hashing both sides.

    Python hashes and pipes the content to zstd (-T0: all cores); a thread reads zstd's output, hashes it and writes it
    to the file, flushing it to disk as it goes. finish() returns the blob entry, commit() renames the file into place.
    """

    def __init__(self, store, level=DEFAULT_LEVEL):
        self.store = store
        self.fd, self.tmp = store.tmp_file("blob-")
        try:
            self.proc = subprocess.Popen(
                [zstd_program(), zstd_level(level), "-T0", "-q", "-c", "--no-progress"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                bufsize=0,
            )
        except BaseException:
            os.close(self.fd)
            os.unlink(self.tmp)
            raise
        grow_pipe(self.proc.stdin.fileno())
        grow_pipe(self.proc.stdout.fileno())
        self.hash = hashlib.sha256()
        self.size = 0
        self.stored_hash = hashlib.sha256()
        self.stored_size = 0
        self.error = None
        self.thread = threading.Thread(target=self._drain, name="zstd-drain", daemon=True)
        self.thread.start()

    def _drain(self):
        synced = 0
        try:
            while True:
                block = self.proc.stdout.read(CHUNK)
                if not block:
                    break
                self.stored_hash.update(block)
                view = memoryview(block)
                while view:
                    view = view[os.write(self.fd, view) :]
                self.stored_size += len(block)
                if self.stored_size - synced >= SYNC_EVERY:
                    # Start writing back what is written so far, without waiting for it (fsync at the end waits).
                    os.posix_fadvise(self.fd, synced, self.stored_size - synced, os.POSIX_FADV_DONTNEED)
                    synced = self.stored_size
        except OSError as e:  # disk full, for example: stop zstd, so that the writer does not wait for ever
            self.error = e
            with contextlib.suppress(OSError):
                self.proc.kill()

    def write(self, data):
        self.hash.update(data)
        self.size += len(data)
        try:
            write_all(self.proc.stdin, data)
        except BrokenPipeError as e:
            self.thread.join()
            raise BackupError(f"writing a blob to {self.store.tmp} failed: {self._why('zstd stopped')}") from e

    def _why(self, otherwise):
        return os_error_text(self.error, self.tmp) if self.error else otherwise

    def finish(self):
        """Wait for zstd and the file; returns {digest, size, stored_digest, stored_size}."""
        self.proc.stdin.close()
        self.thread.join()
        err = self.proc.stderr.read().decode(errors="replace").strip()
        rc = self.proc.wait()
        if self.error or rc != 0:
            raise BackupError(f"writing a blob to {self.store.tmp} failed: {self._why(err or f'zstd exit {rc}')}")
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        return {
            "digest": "sha256:" + self.hash.hexdigest(),
            "size": self.size,
            "stored_digest": "sha256:" + self.stored_hash.hexdigest(),
            "stored_size": self.stored_size,
        }

    def commit(self, digest):
        self.store.commit_file(self.tmp, self.store.blob_path(digest))
        self.tmp = None

    def abort(self):
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.kill()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                pipe.close()
        self.proc.wait()
        self.thread.join(timeout=5)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)
            self.tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.abort()  # after commit() there is nothing left to remove
        return False


class ChunkedLayerWriter:
    """Stores a layer tar as it is written (write_layer's `out`) as content-defined chunks (overlay's
    MemberChunker), each a blob named by the sha256 of its content, so a chunk the store has is never written again.

    New chunks go uncompressed to tmp/ and are compressed in batches, one `zstd --rm` for many files, in the background
    while the layer is still being read (a zstd process per chunk would cost more than the compression). finish() waits
    for them, makes them durable (syncfs: one call, not one fsync per chunk), renames each into blobs/ and fsyncs the
    folder; only then may a manifest name them. abort() removes what is left in tmp/.
    """

    BATCH_BYTES = 32 * 1024 * 1024
    BATCH_FILES = 256
    RUNNING = 2

    def __init__(self, store, known, level=DEFAULT_LEVEL, progress=None, **sizes):
        self.store = store
        self.progress = progress
        self.known = known
        self.level = zstd_level(level)
        self.chunker = MemberChunker(self._chunk, **sizes)
        self.order = []  # digests, in the layer's order
        self.pending = []  # (digest, size, tmp path) not yet given to zstd
        self.pending_bytes = 0
        self.jobs = []  # (Popen, batch)
        self.new = {}  # digest -> (size, tmp path)
        self.size = 0
        self.chunks_new = 0
        self.chunks_reused = 0
        self.entries = {}  # digest -> blob entry of the chunks compressed so far
        self.written = 0

    # write_layer's output

    def write(self, data):
        return self.chunker.write(data)

    def mark(self, name, size):
        self.chunker.mark(name, size)

    def _chunk(self, data):
        digest = sha256_of(data)
        self.size += len(data)
        self.order.append(digest)
        if digest in self.known or digest in self.new:
            self.chunks_reused += 1
            return
        try:
            fd, path = self.store.tmp_file("chunk-")
        except OSError as e:
            raise BackupError(f"a chunk cannot be written: {os_error_text(e, self.store.tmp, len(data))}") from e
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(path)
            if isinstance(e, OSError):  # the store's disk, not the container's files: not a reason to fall back
                raise BackupError(f"a chunk cannot be written: {os_error_text(e, path, len(data))}") from e
            raise
        self.new[digest] = (len(data), path)
        self.chunks_new += 1
        self.pending.append((digest, len(data), path))
        self.pending_bytes += len(data)
        if len(self.pending) >= self.BATCH_FILES or self.pending_bytes >= self.BATCH_BYTES:
            self._compress()

    def _compress(self):
        """Start a zstd for the pending chunks, after collecting the jobs that ended (at most RUNNING at once)."""
        if not self.pending:
            return
        for job in [job for job in self.jobs if job[0].poll() is not None]:
            self._collect(job)
        if len(self.jobs) >= self.RUNNING:
            self._collect(self.jobs[0])
        batch, self.pending, self.pending_bytes = self.pending, [], 0
        err = tempfile.TemporaryFile()  # noqa: SIM115 (closed in _collect or abort)
        try:
            proc = subprocess.Popen(
                [zstd_program(), self.level, "-q", "-f", "--rm", "--", *(entry[2] for entry in batch)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        except OSError as e:
            err.close()
            raise BackupError(f"zstd cannot be started to compress chunks: {e}") from e
        self.jobs.append((proc, batch, err))

    def _collect(self, job):
        """Wait for one zstd job and take its chunks' entries (the compressed files stay in tmp/ until finish)."""
        proc, batch, err = job
        self.jobs.remove(job)
        try:
            rc = proc.wait()
            err.seek(0)
            message = err.read().decode(errors="replace").strip()[-2000:]
        finally:
            err.close()
        if rc != 0:
            raise BackupError(f"zstd could not compress chunks in {self.store.tmp}: {message or f'exit status {rc}'}")
        for digest, size, path in batch:
            compressed = path + ".zst"
            entry = {
                "digest": digest,
                "size": size,
                "stored_digest": file_sha256(compressed),
                "stored_size": os.stat(compressed).st_size,
            }
            self.entries[digest] = entry
            self.written += entry["stored_size"]
        if self.progress:
            self.progress.update(bytes_written=self.written)

    # the end

    def finish(self):
        """Returns (the layer's blob entries in order, bytes written to the store)."""
        self.chunker.close()
        self._compress()
        while self.jobs:
            self._collect(self.jobs[0])
        entries, written = self.entries, self.written
        if entries:
            sync_filesystem(self.store.tmp)
            for digest, (_size, path) in self.new.items():
                os.rename(path + ".zst", self.store.blob_path(digest))
            fsync_dir(self.store.blobs)
        self.known.update((digest, dict(entry)) for digest, entry in entries.items())
        self.new = {}
        return [dict(self.known[digest]) for digest in self.order], written

    def abort(self):
        for proc, _batch, err in self.jobs:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.kill()
            proc.wait()
            err.close()
        self.jobs = []
        for _size, path in self.new.values():
            for leftover in (path, path + ".zst"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)
        self.new = {}


# ---- reading tar streams -------------------------------------------------------------------------------------------
