"""Raw HTTP/1.1 and HTTP/2 clients for what SDKs never send: bodies in many pieces with pauses
between them, chunked bodies with trailers, HTTP/2 DATA frames followed by a trailers frame,
any `accept-encoding`. Each call is bounded by its timeout and answers a `Reply` (the body is
returned as received: decoding it is the caller's business, so a compressed answer shows).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events

from tests.e2e.conftest import Reply


@dataclass
class Body:
    """How a request body arrives: its pieces, the pause before each piece after the first, and
    the trailers that follow it (None: none)."""

    pieces: list[bytes]
    pause_s: float = 0.0
    trailers: list[tuple[str, str]] | None = None


def split(data: bytes, parts: int) -> list[bytes]:
    """`data` in `parts` pieces of nearly equal size (never an empty piece)."""
    parts = max(1, min(parts, len(data)))
    step = -(-len(data) // parts)
    return [data[i:i + step] for i in range(0, len(data), step)]


def _read_http1(sock: socket.socket, deadline: float) -> Reply:
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += _recv(sock, deadline)
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        need = int(headers["content-length"])
        while len(rest) < need:
            rest += _recv(sock, deadline)
        return Reply(status, headers, rest[:need])
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            while b"\r\n" not in rest:
                rest += _recv(sock, deadline)
            size_line, rest = rest.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                rest += _recv(sock, deadline)
            body += rest[:size]
            rest = rest[size + 2:]
            if size == 0:
                return Reply(status, headers, body)
    while True:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        rest += chunk
    return Reply(status, headers, rest)


def _recv(sock: socket.socket, deadline: float) -> bytes:
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("connection closed before the answer was complete")
    return chunk


def http1(port: int, method: str, path: str, headers: dict[str, str], body: Body | None,
          *, chunked: bool, timeout: float = 15) -> Reply:
    """One HTTP/1.1 request on a fresh connection: content-length (`chunked=False`) or
    chunked transfer coding with one chunk per piece (and the trailers, if any)."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        data = b"".join(body.pieces) if body else b""
        lines = [f"{method} {path} HTTP/1.1", f"host: 127.0.0.1:{port}", "connection: close"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if body is not None:
            if chunked:
                lines.append("transfer-encoding: chunked")
                if body.trailers:
                    lines.append("trailer: " + ", ".join(n for n, _ in body.trailers))
            else:
                lines.append(f"content-length: {len(data)}")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if body is not None:
            for i, piece in enumerate(body.pieces):
                if i and body.pause_s:
                    time.sleep(body.pause_s)
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            if chunked:
                tail = "".join(f"{n}: {v}\r\n" for n, v in body.trailers or [])
                sock.sendall(b"0\r\n" + tail.encode("latin-1") + b"\r\n")
        return _read_http1(sock, deadline)


def http2(port: int, method: str, path: str, headers: dict[str, str], body: Body | None,
          *, timeout: float = 15) -> Reply:
    """One HTTP/2 request (prior knowledge, cleartext) on a fresh connection: one DATA frame
    per piece, then END_STREAM on the last one or on a trailers frame."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        stream = conn.get_next_available_stream_id()
        head = [(":method", method), (":path", path), (":scheme", "http"), (":authority", f"127.0.0.1:{port}")]
        head += list(headers.items())
        conn.send_headers(stream, head, end_stream=body is None)
        sock.sendall(conn.data_to_send())
        status, reply_headers, data, done = 0, {}, b"", False

        def pump(block: bool):
            nonlocal status, reply_headers, data, done
            sock.settimeout(max(0.01, deadline - time.monotonic()) if block else 0.001)
            try:
                chunk = sock.recv(65536)
            except (socket.timeout, BlockingIOError):
                return
            if not chunk:
                raise ConnectionError("connection closed before the answer was complete")
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    reply_headers = {k.lower(): v for k, v in event.headers}
                    status = int(reply_headers.pop(":status"))
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    done = True
            sock.sendall(conn.data_to_send())

        if body is not None:
            for i, piece in enumerate(body.pieces):
                if i and body.pause_s:
                    time.sleep(body.pause_s)
                pump(block=False)
                if done:
                    break
                last = i == len(body.pieces) - 1 and not body.trailers
                conn.send_data(stream, piece, end_stream=last)
                sock.sendall(conn.data_to_send())
            if body.trailers and not done:
                conn.send_headers(stream, body.trailers, end_stream=True)
                sock.sendall(conn.data_to_send())
        while not done:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no complete HTTP/2 answer to {method} {path} within {timeout}s")
            pump(block=True)
        return Reply(status, reply_headers, data)


def stream_until(port: int, path: str, headers: dict[str, str], marker: bytes, *, protocol: str,
                 timeout: float = 30, opened=None) -> Reply:
    """GETs an SSE stream over `protocol` ("h1" or "h2") and reads it until `marker` has
    arrived (then hangs up), or until `timeout`. `opened` (a threading.Event) is set once the
    response head is in, so the caller can start the turn it wants to see."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        if protocol == "h1":
            lines = [f"GET {path} HTTP/1.1", f"host: 127.0.0.1:{port}"] + [f"{k}: {v}" for k, v in headers.items()]
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += _recv(sock, deadline)
            head, raw = buf.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            reply_headers = {n.strip().lower(): v.strip() for n, _, v in (l.partition(":") for l in lines[1:])}
            if opened is not None:
                opened.set()
            body = b""
            while marker not in body and time.monotonic() < deadline:
                while True:  # de-chunk what is complete
                    if b"\r\n" not in raw:
                        break
                    size_line, rest = raw.split(b"\r\n", 1)
                    size = int(size_line.split(b";")[0] or b"0", 16)
                    if len(rest) < size + 2:
                        break
                    body += rest[:size]
                    raw = rest[size + 2:]
                if marker in body:
                    break
                raw += _recv(sock, deadline)
            return Reply(int(lines[0].split(" ")[1]), reply_headers, body)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        head = [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", f"127.0.0.1:{port}")]
        conn.send_headers(stream, head + list(headers.items()), end_stream=True)
        sock.sendall(conn.data_to_send())
        status, reply_headers, body = 0, {}, b""
        while marker not in body and time.monotonic() < deadline:
            for event in conn.receive_data(_recv(sock, deadline)):
                if isinstance(event, h2.events.ResponseReceived):
                    reply_headers = {k.lower(): v for k, v in event.headers}
                    status = int(reply_headers.pop(":status"))
                    if opened is not None:
                        opened.set()
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return Reply(status, reply_headers, body)
            sock.sendall(conn.data_to_send())
        return Reply(status, reply_headers, body)


def stream_around(port: int, path: str, headers: dict[str, str], marker: bytes, *, protocol: str,
                  action, timeout: float = 30) -> Reply:
    """Opens the SSE stream `path`, runs `action()` once its head is in (e.g. the send that
    starts a turn), and returns what arrived until `marker` (see `stream_until`)."""
    import threading

    opened, box = threading.Event(), {}

    def read():
        box["reply"] = stream_until(port, path, headers, marker, protocol=protocol, timeout=timeout,
                                    opened=opened)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not opened.wait(15):
        raise TimeoutError(f"the stream {path} did not open")
    action()
    reader.join(timeout)
    if "reply" not in box:
        raise TimeoutError(f"the stream {path} did not reach {marker!r} within {timeout}s")
    return box["reply"]
