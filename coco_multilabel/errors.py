"""Errors a user can cause and fix: entry points print them without a traceback and exit 2."""


class UserError(Exception):
    """Bad input (missing folder, malformed file, wrong checkpoint); the message names file and fix."""

    def __init__(self, message: str = ""):
        # A DataLoader worker re-raises what it caught as UserError("Caught UserError in DataLoader
        # worker ... Original Traceback ... UserError: <message>"); the user needs the last line only.
        if message.startswith("Caught UserError") and "Traceback" in message:
            message = message.rstrip().splitlines()[-1].partition("UserError: ")[2] or message
        super().__init__(message)
