"""Errors a user can cause and fix: entry points print them without a traceback and exit 2."""


class UserError(Exception):
    """Bad input (missing folder, malformed file, wrong checkpoint); the message names file and fix."""
