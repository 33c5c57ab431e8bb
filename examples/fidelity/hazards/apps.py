"""What real projects do in ready() that a fork shares or loses: a
connection opened outside the ORM (here a socket to a small echo server),
a background thread (APM and error-tracking agents), a module-level random
generator. Installed only when FIDELITY_HAZARDS is set: "1" for all of
them, or a comma-separated choice of "socket", "random". With
FIDELITY_HAZARDS_FIXED set, the generator is reseeded after every fork by an
os.register_at_fork hook, the documented fix.
"""

import os
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


def _wanted(hazard: str) -> bool:
    chosen = os.environ.get("FIDELITY_HAZARDS", "")
    return chosen == "1" or hazard in chosen.split(",")


class HazardsConfig(AppConfig):
    name = "hazards"

    def ready(self):
        global CONNECTION
        if _wanted("socket"):
            CONNECTION, server = socket.socketpair()
            threading.Thread(
                target=_echo_server, args=(server,), name="echo-server", daemon=True
            ).start()
        if os.environ.get("FIDELITY_HAZARDS_FIXED"):
            os.register_at_fork(after_in_child=RNG.seed)
