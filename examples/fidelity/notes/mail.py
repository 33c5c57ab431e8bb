"""A mail backend that prints each message's recipients: deterministic output
(no date, no message id) that shows who a command mailed."""

import sys

from django.core.mail.backends.base import BaseEmailBackend


class RecipientsBackend(BaseEmailBackend):
    def send_messages(self, messages):
        for message in messages:
            sys.stdout.write(f"mail to: {', '.join(message.recipients())}\n")
        return len(messages)
