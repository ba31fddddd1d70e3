"""A local TCP port nothing listens on (the OS picked it free; its socket is closed before it is used):
for a server a test starts, or for an address that must not answer."""

import socket


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
