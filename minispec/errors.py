"""The one exception minispec raises for bad input; the command-line scripts print it as one line and exit with status 2."""


class MinispecError(Exception):
    """Bad input from the user: a missing checkpoint, a prompt too long, an unknown method..."""
