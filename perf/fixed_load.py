#!/usr/bin/env python3
"""Sends exactly N small JSON POSTs over C keep-alive connections and exits.

For instruction counts (callgrind) a fixed amount of work matters more than speed: the proxy's
instructions divided by N is its cost per request. Every answer must be a 200 with the body its
Content-Length (or chunked framing) announces, or the run fails.

    perf/fixed_load.py PORT N [CONNS] [GAP_US]

GAP_US waits that long after each answer before the next request on that connection, so that a
slow (instrumented) proxy has finished with one request before the next arrives: every request
then takes the same path, and instruction counts repeat from run to run.
"""
import selectors
import socket
import sys
import time

BODY = b'{"model":"mock","messages":[{"role":"user","content":"Say hello in one short sentence."}]}'
REQ = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Type: application/json\r\nContent-Length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)


def response_end(buf):
    """Length of the first complete response in buf, or None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].decode("latin-1").lower()
    if not head.startswith("http/1.1 200"):
        raise SystemExit("unexpected answer: " + head.splitlines()[0])
    start = end + 4
    for line in head.split("\r\n")[1:]:
        k, _, v = line.partition(":")
        if k.strip() == "content-length":
            n = int(v)
            return start + n if len(buf) >= start + n else None
        if k.strip() == "transfer-encoding":
            last = buf.find(b"\r\n0\r\n\r\n", start - 2)
            return last + 7 if last >= 0 else None
    raise SystemExit("answer without framing")


def main():
    port, total = int(sys.argv[1]), int(sys.argv[2])
    conns = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    gap = int(sys.argv[4]) / 1e6 if len(sys.argv) > 4 else 0
    sel = selectors.DefaultSelector()
    sent = done = 0
    for _ in range(min(conns, total)):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(REQ)
        sent += 1
        sel.register(s, selectors.EVENT_READ, bytearray())
    while done < total:
        for key, _ in sel.select():
            s, buf = key.fileobj, key.data
            chunk = s.recv(65536)
            if not chunk:
                raise SystemExit("connection closed after %d answers" % done)
            buf += chunk
            n = response_end(buf)
            if n is None:
                continue
            del buf[:n]
            done += 1
            if sent < total:
                if gap:
                    time.sleep(gap)
                s.sendall(REQ)
                sent += 1
            else:
                sel.unregister(s)
                s.close()
    print(done)


if __name__ == "__main__":
    main()
