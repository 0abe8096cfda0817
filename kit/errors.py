"""The one error type the CLI turns into a one-line message and a non-zero exit."""


class KitError(Exception):
    """A user-facing problem (bad recipe, bad file, bad argument); its message names the file and the problem."""
