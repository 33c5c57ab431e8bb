import sys

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = (
        "Write --bytes bytes of 100-byte lines to stdout as fast as possible "
        "(for bench/output.py's throughput)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--bytes",
            type=int,
            default=1_000_000,
            help="Bytes to write (default 1000000).",
        )

    def handle(self, *args, **options):
        line = b"x" * 99 + b"\n"
        block = line * 640  # 64,000 bytes per write
        total = options["bytes"]
        out = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else None
        write = (
            out.write if out is not None else (lambda b: sys.stdout.write(b.decode()))
        )
        written = 0
        while written + len(block) <= total:
            write(block)
            written += len(block)
        write(block[: total - written])
        if out is not None:
            out.flush()
