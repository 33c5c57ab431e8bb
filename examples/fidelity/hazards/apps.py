"""What real projects do in ready() that a fork shares or loses: a
connection opened outside the ORM (here a socket to a small echo server),
a background thread (APM and error-tracking agents), a module-level random
generator. Installed only when FIDELITY_HAZARDS is set."""

import random
import socket
import threading

from django.apps import AppConfig

RNG = random.Random()
CONNECTION = None


def _echo_server(sock: socket.socket) -> None:
    # The server side of the connection: answers each request with its
    # sequence number, like a database answering queries in order.
    served = 0
    while data := sock.recv(64):
        served += 1
        sock.sendall(b"answer %d to %s\n" % (served, data.strip()))


def ping() -> str:
    CONNECTION.sendall(b"ping\n")
    return CONNECTION.recv(64).decode().strip()


class HazardsConfig(AppConfig):
    name = "hazards"

    def ready(self):
        global CONNECTION
        CONNECTION, server = socket.socketpair()
        threading.Thread(
            target=_echo_server, args=(server,), name="echo-server", daemon=True
        ).start()
