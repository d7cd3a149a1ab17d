"""The error a user can act on: main.py prints its message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input or setup the user can fix; the message names the file or flag and what to do."""
