from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = 'Ask "Are you sure? " with input() and print "answer: <reply>".'

    def handle(self, *args, **options):
        answer = input("Are you sure? ")
        self.stdout.write(f"answer: {answer}")
