#!/usr/bin/python3
"""gpulab TEST STAND-IN for nvidia-docker 1.0's nvidia-docker-plugin: a Docker volume plugin named nvidia-docker.

The real plugin (a Go program, 2016-2017) served volumes like ``nvidia_driver_384.81`` holding the host's driver
files. This stand-in keeps the protocol and the name, so that Docker can create volumes of driver ``nvidia-docker``
and containers that use them, as on a server that still carries an nvidia-docker 1.0 install; the volumes are empty
folders under the state directory. Docker finds it through /etc/docker/plugins/nvidia-docker.spec (see the unit).

Usage: nvidia-docker-plugin -s SOCK_DIR      (listens on SOCK_DIR/nvidia-docker.sock)
"""

from __future__ import annotations

import argparse
import json
import os
import socketserver
import sys
from http.server import BaseHTTPRequestHandler

CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"


class VolumeStore:
    """Volume names, kept in STATE_DIR/volumes.json so that they survive a restart of the plugin."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, "volumes.json")
        try:
            with open(self.path, encoding="utf-8") as f:
                self.names = set(json.load(f))
        except (OSError, ValueError):
            self.names = set()

    def mountpoint(self, name: str) -> str:
        return os.path.join(self.state_dir, "volumes", name)

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(sorted(self.names), f)
        os.replace(tmp, self.path)

    def create(self, name: str) -> None:
        os.makedirs(self.mountpoint(name), exist_ok=True)
        self.names.add(name)
        self.save()

    def remove(self, name: str) -> None:
        path = self.mountpoint(name)
        if os.path.isdir(path):
            os.rmdir(path)
        self.names.discard(name)
        self.save()


class Handler(BaseHTTPRequestHandler):
    server_version = "nvidia-docker-plugin-gpulab-standin/1.0.1"
    store: VolumeStore

    def log_message(self, fmt: str, *args: object) -> None:
        sys.stderr.write("nvidia-docker-plugin: " + (fmt % args) + "\n")

    def reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            request = json.loads(raw) if raw.strip() else {}
        except ValueError:
            request = {}
        endpoint = ENDPOINTS.get(self.path)
        if endpoint is None:
            self.reply({"Err": f"{self.path} is not implemented by the gpulab stand-in"})
        else:
            self.reply(endpoint(self.store, request.get("Name", "")))


def _known(store: VolumeStore, name: str, body: dict) -> dict:
    return body if name in store.names else {"Err": f"no such volume: {name}"}


def _create(store: VolumeStore, name: str) -> dict:
    store.create(name)
    return {"Err": ""}


def _remove(store: VolumeStore, name: str) -> dict:
    store.remove(name)
    return {"Err": ""}


def _list(store: VolumeStore, _name: str) -> dict:
    return {"Volumes": [{"Name": n, "Mountpoint": store.mountpoint(n)} for n in sorted(store.names)], "Err": ""}


# Docker's volume plugin protocol: https://docs.docker.com/engine/extend/plugins_volume/
ENDPOINTS = {
    "/Plugin.Activate": lambda store, name: {"Implements": ["VolumeDriver"]},
    "/VolumeDriver.Capabilities": lambda store, name: {"Capabilities": {"Scope": "local"}},
    "/VolumeDriver.Create": _create,
    "/VolumeDriver.Remove": _remove,
    "/VolumeDriver.Mount": lambda store, name: _known(store, name, {"Mountpoint": store.mountpoint(name), "Err": ""}),
    "/VolumeDriver.Path": lambda store, name: _known(store, name, {"Mountpoint": store.mountpoint(name), "Err": ""}),
    "/VolumeDriver.Unmount": lambda store, name: {"Err": ""},
    "/VolumeDriver.Get": lambda store, name: _known(
        store, name, {"Volume": {"Name": name, "Mountpoint": store.mountpoint(name)}, "Err": ""}
    ),
    "/VolumeDriver.List": _list,
}


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):
        request, _ = super().get_request()
        return request, ("nvidia-docker", 0)  # BaseHTTPRequestHandler wants a (host, port) client address


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-s", "--socket-dir", default="/var/lib/nvidia-docker")
    args = parser.parse_args()
    os.makedirs(args.socket_dir, exist_ok=True)
    sock = os.path.join(args.socket_dir, "nvidia-docker.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    Handler.store = VolumeStore(args.socket_dir)
    with Server(sock, Handler) as server:
        sys.stderr.write(f"nvidia-docker-plugin (gpulab TEST STAND-IN): serving on {sock}\n")
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
