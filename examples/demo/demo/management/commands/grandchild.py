import subprocess
import time

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = 'Start a "sleep 1000" child, print "grandchild <pid>", sleep forever.'

    def handle(self, *args, **options):
        proc = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL)
        self.stdout.write(f"grandchild {proc.pid}")
        self.stdout.flush()
        while True:
            time.sleep(60)
