import os
import sys

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "print() without flushing, then os._exit(code): buffered output is lost."

    def add_arguments(self, parser):
        parser.add_argument("code", type=int)

    def handle(self, *args, **options):
        print("this line is still in the buffer")
        sys.stderr.write("stderr is line-buffered\n")
        os._exit(options["code"])
