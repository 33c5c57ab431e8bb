"""A log handler that ships records from a thread of its own, started when
the handler is made, and waits at exit for what is queued, as log shippers
do (google-cloud-logging's background transport, say). Here it "ships" to a
file. Made by the settings' LOGGING: each process's configuration makes one.
"""

import atexit
import logging
import os
import queue
import threading


class ShippingHandler(logging.Handler):
    def __init__(self, filename: str) -> None:
        super().__init__()
        self.filename = os.path.abspath(filename)
        self.pending: queue.Queue = queue.Queue()
        threading.Thread(target=self._ship, name="log-shipper", daemon=True).start()
        atexit.register(self.pending.join)

    def emit(self, record: logging.LogRecord) -> None:
        self.pending.put(self.format(record))

    def _ship(self) -> None:
        while True:
            line = self.pending.get()
            with open(self.filename, "a") as shipped:
                shipped.write(line + "\n")
            self.pending.task_done()
