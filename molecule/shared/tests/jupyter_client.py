"""A small Jupyter HTTP client for the notebook and backup scenarios' tests, standard library only, so that the same
code runs on the control node (through the SSH tunnel) and, copied, inside the instance (python3 jupyter_client.py).

It logs in the way a browser does: with ?token=... in the URL, or with the password form (/login, the _xsrf cookie)
and the session cookie afterwards.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import urllib.parse
from http.cookies import SimpleCookie


class Jupyter:
    def __init__(self, host, port, token=None, timeout=10.0):
        self.host, self.port, self.token, self.timeout = host, int(port), token, timeout
        self.cookies = {}

    def request(self, method, path, body=None, form=None):
        """(status, text) of one request; no redirect is followed."""
        if self.token:
            path += ("&" if "?" in path else "?") + "token=" + urllib.parse.quote(self.token)
        headers = {}
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body), "application/json"
        if form is not None:
            data, headers["Content-Type"] = urllib.parse.urlencode(form), "application/x-www-form-urlencoded"
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{key}={value}" for key, value in self.cookies.items())
        if "_xsrf" in self.cookies:
            headers["X-XSRFToken"] = self.cookies["_xsrf"]
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            for header in response.headers.get_all("Set-Cookie") or []:
                for key, morsel in SimpleCookie(header).items():
                    self.cookies[key] = morsel.value
            return response.status, response.read().decode(errors="replace")
        finally:
            connection.close()

    def login(self, password):
        """The password form, as a browser sends it; returns the status (302 to the notebook list on success)."""
        self.request("GET", "/login")
        status, _ = self.request("POST", "/login", form={"password": password, "_xsrf": self.cookies.get("_xsrf", "")})
        return status

    def status(self):
        return self.request("GET", "/api/status")[0]

    def start_kernel(self):
        """Start a kernel (what opening a notebook does); returns the status (201 when it started)."""
        return self.request("POST", "/api/kernels", body={})[0]

    def put_file(self, name, text):
        """Save a text file through the contents API (what the notebook's editor does)."""
        body = {"type": "file", "format": "text", "content": text}
        return self.request("PUT", "/api/contents/" + urllib.parse.quote(name), body=body)[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--token")
    parser.add_argument("--password")
    parser.add_argument("--put", nargs=2, metavar=("NAME", "TEXT"))
    parser.add_argument("--get", action="append", default=[], metavar="PATH", help="statuses under 'get', in order")
    parser.add_argument("--start-kernel", action="store_true", help="start a kernel: its status under 'kernel'")
    args = parser.parse_args(argv)
    client = Jupyter(args.host, args.port, token=args.token)
    result = {}
    if args.password is not None:
        result["login"] = client.login(args.password)
    result["status"] = client.status()
    if args.put:
        result["put"] = client.put_file(*args.put)
    if args.get:
        result["get"] = [client.request("GET", path)[0] for path in args.get]
    if args.start_kernel:
        result["kernel"] = client.start_kernel()
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
