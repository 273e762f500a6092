"""The one exception type the command line turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user (a config key, a file, a name); the message says how to fix it."""
