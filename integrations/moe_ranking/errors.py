"""User-facing errors of the reference integration.

Every problem a user can fix (a missing data file, a bad column, a label outside {0, 1}, an
unknown model name) is raised as a :class:`UserError` subclass. The command line prints its message
and exits with status 2, without a traceback and without leaving anything in the output folder.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; the CLI prints the message and exits with status 2."""


class DataError(UserError):
    """Missing data files, missing columns, invalid labels or feature values."""


class ConfigError(UserError):
    """An invalid option or combination (unknown model or balancer, ESMM without funnel tasks)."""
