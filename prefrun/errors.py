"""Errors that end a run with one clear line (no stack trace): bad input, bad config, a diverged loss."""


class PrefrunError(Exception):
    """Base: `prefrun` prints the message and exits with status 2."""


class InputError(PrefrunError, ValueError):
    """A config value, file or record that prefrun cannot use; the message names it and says what to do."""
