"""What production projects run beside their commands, installed only when
FIDELITY_INTEGRATIONS is set (tests/python/test_fidelity_integrations.py):
sentry-sdk initialised in the settings (its transport is a background thread,
flushed by an exit handler), and logging to files (a FileHandler, a
RotatingFileHandler, and a QueueHandler whose QueueListener, started in
ready() and stopped by an exit handler, writes to a file from its thread).
"""
