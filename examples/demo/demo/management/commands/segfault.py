import ctypes
import os
import signal
import sys

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = 'Print "about to crash" then die from SIGSEGV (signal 11).'

    def handle(self, *args, **options):
        self.stdout.write("about to crash")
        self.stdout.flush()
        sys.stdout.flush()
        # Restore the default disposition in case a handler was installed.
        signal.signal(signal.SIGSEGV, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGSEGV)
        # Not reached normally; dereference NULL as a fallback.
        ctypes.string_at(0)
