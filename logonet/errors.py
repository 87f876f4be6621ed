"""Errors that the CLI turns into one clear line (exit code 2) instead of a traceback."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a file that is not a volume, a 2-D image, a corrupt model, ...).

    The message must say what is wrong and, where possible, what to do about it.
    """
