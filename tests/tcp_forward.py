"""A tiny TCP forwarder for tests: listen on one loopback address, relay to another.

Used to run two ``msrun`` "nodes" on one machine: msrun spawns the scheduler on every node
whose own address equals ``--master_addr``; on one machine 127.0.0.1 is everybody's own, so
node 1 is given 127.0.0.2 (not one of its addresses, still loopback) forwarded to 127.0.0.1.
"""
from __future__ import annotations

import socket
import socketserver
import threading


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def forward(listen: tuple[str, int], target: tuple[str, int]) -> socketserver.BaseServer:
    """Start forwarding in a background thread; call ``.shutdown()`` on the result to stop."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            upstream = socket.create_connection(target, timeout=30)
            upstream.settimeout(None)
            t = threading.Thread(target=_pipe, args=(upstream, self.request), daemon=True)
            t.start()
            _pipe(self.request, upstream)
            t.join()

    server = _Server(listen, Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
