"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong and how to fix it."""
