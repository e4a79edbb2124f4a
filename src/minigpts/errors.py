"""One exception type for bad user input: the CLI prints it as one line and exits with code 2."""


class UserError(Exception):
    """A problem with what the user asked for (a path, a flag, a corpus), not a bug."""
