# Copyright (c) gpulab developers
# SPDX-License-Identifier: MIT

"""The Docker engine API over its Unix socket: gpulab's one client of the engine.

Every gpulab module that talks to the engine (container_backup, container_restore, docker_image_archive,
docker_image_pull_progress) and the backup timer's command line use this client, and get its one error type,
DockerApiError, whose message the user can act on. Nothing here knows about backups or archives: it moves bytes and
JSON, and callers decide what an answer means.

Why not the Docker SDK for Python (or community.docker's vendored API client): both read the engine with a socket
timeout (60 s by default) that long image transfers trip over, and neither lets a caller stream a request body of
unknown length in chunks while counting it, or read a long JSON message stream and write its progress to a file as
it goes. This is the small part of the API gpulab needs, with Python's standard library only, so that the modules run
on a server that has nothing but python3: requests in chunks (chunked transfer encoding), responses read in chunks,
no read timeout unless one is asked for.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from urllib.parse import quote, urlencode

CHUNK = 1024 * 1024


class DockerApiError(Exception):
    """The engine did not answer, or refused, with a message the user can act on."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.socket_file = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_file)
        self.sock = sock


def socket_path(docker_host):
    """The socket file of docker_host: unix:///path or a plain absolute path; only local sockets are supported."""
    if docker_host.startswith("/"):
        return docker_host
    if not docker_host.startswith("unix://"):
        raise DockerApiError(f"docker_host {docker_host} is not a unix:// socket; only local sockets are supported.")
    return docker_host[len("unix://") :]


def query(path, **params):
    """path?params, leaving out parameters that are None."""
    kept = {k: v for k, v in params.items() if v is not None}
    return path + ("?" + urlencode(kept) if kept else "")


def quoted(name):
    """An image or container name or ID, quoted for a URL path (a registry:port/name has ':' and '/')."""
    return quote(name, safe="")


def error_of(body):
    """The engine's error message in a response body (JSON {"message": ...} or plain text)."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:500]
    if isinstance(data, dict):
        return str(data.get("message") or data.get("error") or data)
    return text.strip()[:500]


class Engine:
    """One Docker engine, reached through its Unix socket. timeout: seconds per socket read, None for no limit."""

    def __init__(self, docker_host="unix:///var/run/docker.sock", timeout=None):
        self.socket = socket_path(docker_host)
        self.timeout = timeout

    def _connection(self, timeout="default"):
        return _UnixConnection(self.socket, self.timeout if timeout == "default" else timeout)

    def _fail(self, what, e):
        raise DockerApiError(f"the Docker engine at {self.socket} does not answer ({what}): {e}") from e

    def request(self, method, path, body=None, *, headers=None, timeout=60):
        """A short request; returns (status, body bytes). JSON bodies are given as dicts."""
        conn = self._connection(timeout)
        headers = dict(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as e:
            self._fail(f"{method} {path}", e)
        finally:
            conn.close()
        return resp.status, data

    def json(self, method, path, body=None, *, ok=(200, 201, 204), headers=None, timeout=60):
        """A short request whose answer is JSON; raises DockerApiError unless the status is one of ok."""
        status, data = self.request(method, path, body, headers=headers, timeout=timeout)
        if status not in ok:
            raise DockerApiError(f"{method} {path.split('?')[0]}: the engine answered {status}: {error_of(data)}")
        return json.loads(data) if data.strip() else None

    def _inspect(self, kind, name):
        """GET /<kind>s/<name>/json: the inspect data, or None when the engine has no such object."""
        status, data = self.request("GET", f"/{kind}s/{quoted(name)}/json")
        if status == 404:
            return None
        if status != 200:
            raise DockerApiError(f"the engine answered {status} when asked for {kind} {name}: {error_of(data)}")
        return json.loads(data)

    def image(self, name):
        """The inspect data of an image (by name or ID), or None when the engine has no such image."""
        return self._inspect("image", name)

    def container(self, name):
        """The inspect data of a container (by name or ID), or None when the engine has no such container."""
        return self._inspect("container", name)

    def has_image(self, name):
        return self.image(name) is not None

    def stream_messages(self, method, path, headers=None):
        """Yield the decoded JSON messages of a long streaming answer (pull, push, build), as they arrive.

        Raises DockerApiError for a refused request, and for an {"error": ...} message in the stream.
        """
        conn = self._connection()
        try:
            conn.request(method, path, headers=headers or {})
            resp = conn.getresponse()
            if resp.status != 200:
                raise DockerApiError(
                    f"{method} {path.split('?')[0]}: the engine answered {resp.status}: {error_of(resp.read())}"
                )
            buffer = b""
            while True:
                block = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
                if not block:
                    break
                buffer += block
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    msg = _decode(line)
                    if msg is not None:
                        yield _checked(msg)
            msg = _decode(buffer)
            if msg is not None:
                yield _checked(msg)
        except OSError as e:
            self._fail(f"{method} {path.split('?')[0]}", e)
        finally:
            conn.close()

    def post_stream(self, path, stream, content_type="application/x-tar", progress=None):
        """POST a body of unknown length from stream.read() in chunks; returns (status, answer bytes, bytes sent).

        progress(sent, finished) is called after each chunk, and with finished=True once the whole body is sent (the
        engine then works on it until it answers: unpacking the layers of an image, for example).
        """
        conn = self._connection()
        sent = 0
        try:
            conn.putrequest("POST", path)
            conn.putheader("Content-Type", content_type)
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            for block in iter(lambda: stream.read(CHUNK), b""):
                conn.send(b"%x\r\n%s\r\n" % (len(block), block))
                sent += len(block)
                if progress:
                    progress(sent, False)
            conn.send(b"0\r\n\r\n")
            if progress:
                progress(sent, True)
            resp = conn.getresponse()
            body = resp.read()
        except OSError as e:
            raise DockerApiError(
                f"the Docker engine at {self.socket} broke off POST {path.split('?')[0]} after {sent} bytes: {e}"
            ) from e
        finally:
            conn.close()
        return resp.status, body, sent

    def get_stream(self, path):
        """GET a long binary answer (for example /images/get); returns an object with read(n) and close()."""
        conn = self._connection()
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
        except OSError as e:
            conn.close()
            self._fail(f"GET {path.split('?')[0]}", e)
        if resp.status != 200:
            body = resp.read()
            conn.close()
            raise DockerApiError(f"GET {path.split('?')[0]}: the engine answered {resp.status}: {error_of(body)}")
        return _Response(conn, resp)

    def start_get(self, path):
        """Send a GET now and read its (long, binary) answer later: returns a PendingGet."""
        return PendingGet(self, path)

    def load(self, stream, progress=None):
        """Stream a plain docker save tar into /images/load; returns the engine's messages and bytes sent."""
        status, body, sent = self.post_stream("/images/load?quiet=1", stream, progress=progress)
        messages, errors = [], []
        for raw in body.decode(errors="replace").splitlines():
            msg = _decode(raw.encode())
            if msg is None:
                continue
            if isinstance(msg, dict) and (msg.get("error") or msg.get("errorDetail")):
                errors.append(msg.get("error") or msg["errorDetail"].get("message", str(msg)))
            elif isinstance(msg, dict) and msg.get("stream"):
                messages.append(msg["stream"].strip())
            elif isinstance(msg, str):
                messages.append(msg)
        if status != 200 or errors:
            why = "; ".join(errors) or body[:500].decode(errors="replace")
            raise DockerApiError(f"the Docker engine refused the image ({status}): {why}")
        return messages, sent


class _Response:
    def __init__(self, conn, resp):
        self.conn = conn
        self.resp = resp

    def read(self, size=-1):
        return self.resp.read(size)

    def close(self):
        self.resp.close()
        self.conn.close()


def _decode(line):
    line = line.strip()
    if not line:
        return None
    try:
        msg = json.loads(line)
    except ValueError:
        return line.decode(errors="replace")
    return msg


def _checked(msg):
    if isinstance(msg, dict) and (msg.get("error") or msg.get("errorDetail")):
        raise DockerApiError(str(msg.get("error") or msg["errorDetail"].get("message", msg)))
    return msg


class ProgressFile:
    """Writes a progress record (JSON: phase, seconds and the caller's figures) to a file, at most once a second.

    A role that runs a long module with async reads the file while it waits and reports it (roles/deepo/tasks/wait.yml).
    The file is replaced atomically, so a reader never sees half a record.
    """

    def __init__(self, path, interval=1.0):
        self.path = path
        self.interval = interval
        self.started = time.monotonic()
        self.last = 0.0

    def write(self, phase, force=False, **figures):
        if not self.path:
            return
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        record = {"phase": phase, "seconds": round(now - self.started)}
        record.update(figures)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, self.path)

    def remove(self):
        if self.path and os.path.exists(self.path):
            os.remove(self.path)


class _UnixConnection10(_UnixConnection):
    """HTTP/1.0: the engine then sends a long answer as it is, until it closes the connection, instead of in chunks of
    32 KiB that http.client would take apart and join again (half the CPU time for a multi-GB docker save)."""

    _http_vsn = 10
    _http_vsn_str = "HTTP/1.0"


class PendingGet:
    """A GET whose request is sent and whose answer is read later: the engine starts working at once (a docker save
    exports the whole image to a temporary folder before its first byte), while the caller does something else."""

    def __init__(self, engine, path):
        self.engine = engine
        self.path = path
        self.conn = _UnixConnection10(engine.socket, engine.timeout)
        try:
            self.conn.request("GET", path)
        except OSError as e:
            self.conn.close()
            engine._fail(f"GET {path.split('?')[0]}", e)

    def response(self):
        """Wait for the answer; returns an object with read(n) and close(), like Engine.get_stream."""
        try:
            resp = self.conn.getresponse()
        except OSError as e:
            self.conn.close()
            self.engine._fail(f"GET {self.path.split('?')[0]}", e)
        if resp.status != 200:
            body = resp.read()
            self.conn.close()
            raise DockerApiError(f"GET {self.path.split('?')[0]}: the engine answered {resp.status}: {error_of(body)}")
        return _Response(self.conn, resp)

    def close(self):
        self.conn.close()
