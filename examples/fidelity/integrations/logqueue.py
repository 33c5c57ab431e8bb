"""The queue between the QueueHandler of the settings' LOGGING and the
QueueListener that ready() starts (Python 3.11's dictConfig does not start
one itself)."""

import queue

QUEUE: queue.Queue = queue.Queue(-1)
