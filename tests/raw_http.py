"""HTTP spoken by hand over a socket, for the tests that must send what no client
library would: pipelined requests, bodies that are themselves requests, bad framing."""
import re
import socket
import time

STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) [^\r\n]*\r\n")


def request_bytes(method, target, port, headers=(), body=b"", host=None):
    """One HTTP/1.1 request; headers is a list of (name, value) pairs sent as given."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {f'127.0.0.1:{port}' if host is None else host}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body and not any(name.lower() in ("content-length", "transfer-encoding")
                        for name, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def exchange(port, data, timeout=5.0, chunks=None):
    """Send data (in the given chunk sizes, if any) on one connection and read until
    the server closes it or timeout passes. Returns (raw bytes, closed by server)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        try:
            if chunks:
                start = 0
                for size in chunks:
                    sock.sendall(data[start:start + size])
                    start += size
                sock.sendall(data[start:])
            else:
                sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the rest was sent; read its answer
        received, deadline = b"", time.monotonic() + timeout
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                part = sock.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                return received, True
            if not part:
                return received, True
            received += part
        return received, False
    finally:
        sock.close()


def responses(raw):
    """[(status, headers dict, body bytes)] parsed from raw, in order; interim 1xx
    answers included. Raises ValueError if raw is not a sequence of responses."""
    found, pos = [], 0
    while pos < len(raw):
        match = STATUS_LINE.match(raw, pos)
        if not match:
            raise ValueError(f"not a response at byte {pos}: {raw[pos:pos + 80]!r}")
        end = raw.index(b"\r\n\r\n", match.start()) + 4
        headers = {}
        for line in raw[match.end():end - 4].split(b"\r\n"):
            if line:
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", 0))
        found.append((int(match.group(1)), headers, raw[end:end + length]))
        pos = end + length
    return found
