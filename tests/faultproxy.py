"""A fault-injecting HTTP proxy on 127.0.0.1, for tests: it stands in front of a local server
(moto's S3) and fails a seeded share of the requests passing through it.

Per request, one of:

- ``pass``: forwarded, and the answer sent back;
- ``500`` / ``503``: answered by the proxy with an S3-style error (``InternalError``,
  ``SlowDown``), never forwarded;
- ``reset-before``: the connection is reset (RST) before the request is forwarded;
- ``reset-after``: the request is forwarded and carried out by the server, then the
  connection is reset before the answer reaches the client. The nastiest case: the client
  cannot tell whether its write happened, and a retry sees its own write.

It speaks just enough HTTP/1.1 for S3 clients: requests and answers framed by
Content-Length or chunked encoding, keep-alive connections. Decisions come from one
``random.Random(seed)``; requests on parallel connections may draw in any order, so a seed
fixes the fault mix, not which exact request fails.
"""

from __future__ import annotations

import random
import socket
import socketserver
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field

FATES = ("pass", "500", "503", "reset-before", "reset-after")

_ERRORS = {
    "500": (b"500 Internal Server Error", b"InternalError", b"We encountered an internal error. Please try again."),
    "503": (b"503 Slow Down", b"SlowDown", b"Please reduce your request rate."),
}


class _Closed(Exception):
    """The peer closed the connection (between requests, or mid-message)."""


def _read_line(buf: bytearray, sock: socket.socket) -> bytes:
    while True:
        i = buf.find(b"\r\n")
        if i >= 0:
            line = bytes(buf[: i + 2])
            del buf[: i + 2]
            return line
        data = sock.recv(65536)
        if not data:
            raise _Closed()
        buf += data


def _read_exact(n: int, buf: bytearray, sock: socket.socket) -> bytes:
    while len(buf) < n:
        data = sock.recv(max(65536, n - len(buf)))
        if not data:
            raise _Closed()
        buf += data
    out = bytes(buf[:n])
    del buf[:n]
    return out


def read_message(
    sock: socket.socket, buf: bytearray, response: bool = False, no_body: bool = False
) -> tuple[bytes, dict[str, str], bytes]:
    """Read one HTTP message: (start line, lower-cased headers, raw bytes of the whole message).

    ``no_body``: an answer to HEAD. An answer framed by neither Content-Length nor chunked
    encoding ends when the server closes the connection.
    """
    start = _read_line(buf, sock)
    raw = bytearray(start)
    headers: dict[str, str] = {}
    while True:
        line = _read_line(buf, sock)
        raw += line
        if line == b"\r\n":
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "expect" and not response:
            # answer "100 Continue" ourselves and forward without the header: the
            # server then simply answers the whole request
            del raw[-len(line) :]
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            continue
        headers[name.strip().lower()] = value.strip()
    status = start.split(b" ", 2)[1] if response else b""
    if no_body or status in (b"204", b"304") or status.startswith(b"1"):
        return start, headers, bytes(raw)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = _read_line(buf, sock)
            raw += size_line
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    line = _read_line(buf, sock)
                    raw += line
                    if line == b"\r\n":
                        break
                break
            raw += _read_exact(size + 2, buf, sock)
    elif "content-length" in headers:
        raw += _read_exact(int(headers["content-length"]), buf, sock)
    elif response:
        headers["connection"] = "close"
        while data := sock.recv(65536):
            buf += data
        raw += buf
        buf.clear()
    return start, headers, bytes(raw)


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN: what a crashed middlebox or server looks like."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


@dataclass
class FaultProxy:
    """Forwards 127.0.0.1:<port> to ``upstream`` (host, port), failing ``rate`` of requests.

    ``mix`` weighs the failure kinds; ``enabled`` can be switched off to let everything
    through. ``counts`` tallies what was done, by fate and by method.
    """

    upstream: tuple[str, int]
    seed: int
    rate: float = 0.15
    mix: dict[str, float] = field(default_factory=lambda: {"500": 1, "503": 1, "reset-before": 1, "reset-after": 1})
    #: a separate share for conditional writes (If-Match / If-None-Match): lost answers to
    #: them are what compare-and-swap and create-only code must survive
    conditional_rate: float | None = None
    enabled: bool = True
    #: lose the answer to the first attempt of every conditional write (and let its retries
    #: through): deterministic, where ``conditional_rate`` depends on the draw
    lose_first_conditional_answer: bool = False
    #: an outage: once this many more requests have passed, every request is reset
    #: (``cut_after``), until ``heal()``
    cut_after: int | None = None
    counts: Counter[str] = field(default_factory=Counter)
    port: int = 0

    def __post_init__(self) -> None:
        self._rnd = random.Random(self.seed)
        self._lock = threading.Lock()
        self._attempted: set[tuple[str, ...]] = set()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def heal(self) -> None:
        with self._lock:
            self.cut_after = None

    def _fate(self, method: str, conditional: bool, attempt: tuple[str, ...]) -> str:
        rate = self.conditional_rate if conditional and self.conditional_rate is not None else self.rate
        with self._lock:
            fate = "pass"
            if conditional and self.lose_first_conditional_answer:
                if attempt not in self._attempted:
                    self._attempted.add(attempt)
                    fate = "reset-after"
            elif self.cut_after is not None:
                if self.cut_after <= 0:
                    fate = "reset-before"
                self.cut_after -= 1
            elif self.enabled and self._rnd.random() < rate:
                kinds = sorted(self.mix)
                fate = self._rnd.choices(kinds, [self.mix[k] for k in kinds])[0]
            self.counts[fate] += 1
            self.counts[f"{method}{' (conditional)' if conditional else ''} {fate}"] += 1
            return fate

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        cbuf, ubuf = bytearray(), bytearray()
        try:
            while True:
                try:
                    start, request_headers, request = read_message(client, cbuf)
                except _Closed:
                    return
                method = start.split(b" ", 1)[0].decode("latin-1")
                conditional = "if-match" in request_headers or "if-none-match" in request_headers
                attempt = (
                    start.decode("latin-1"),
                    request_headers.get("if-match", ""),
                    request_headers.get("if-none-match", ""),
                    request_headers.get("content-md5", request_headers.get("content-length", "")),
                )
                fate = self._fate(method, conditional and method != "GET", attempt)
                if fate == "reset-before":
                    _reset(client)
                    return
                if fate in _ERRORS:
                    status, code, message = _ERRORS[fate]
                    body = b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>%s</Code><Message>%s</Message></Error>' % (
                        code,
                        message,
                    )
                    client.sendall(
                        b"HTTP/1.1 %s\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n\r\n%s"
                        % (status, len(body), body)
                    )
                    continue
                if upstream is None:
                    upstream = socket.create_connection(self.upstream)
                    ubuf = bytearray()
                upstream.sendall(request)
                try:
                    _, headers, response = read_message(upstream, ubuf, response=True, no_body=method == "HEAD")
                except _Closed:
                    _reset(client)
                    return
                if fate == "reset-after":
                    _reset(client)
                    return
                client.sendall(response)
                if headers.get("connection", "").lower() == "close":
                    return
        except OSError:
            return  # the client went away
        finally:
            if upstream is not None:
                upstream.close()
            try:
                client.close()
            except OSError:
                pass
