"""The one base class of the errors a user can fix (a bad file, option or configuration).

Every command's error for bad input derives from `UserError`: ``sonocl`` prints it as one line,
``sonocl COMMAND: message``, and exits with ``exit_code`` (2). Any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the file or option, what is wrong and the fix."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names the key and the allowed values."""
