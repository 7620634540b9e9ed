"""One error hierarchy for problems the user can fix.

Every error fixq raises about a user's input (command line, model, weights, data, plan,
config) derives from :class:`FixqError`; the ``fixq`` command prints it as one line with a
hint and exits with code 2. Anything else that escapes is a bug in fixq (exit code 1).

>>> from fixq.planning.plan import PlanError
>>> issubclass(PlanError, FixqError) and issubclass(FixqError, ValueError)
True
"""
from __future__ import annotations

__all__ = ["FixqError", "os_error_reason"]


class FixqError(ValueError):
    """A user, data, model or plan problem: printed as one line, exit code 2.

    Subclasses live next to the code that raises them (``PlanError`` in planning/plan.py,
    ``DataError`` in data/images.py, ...) and stay importable from there. It derives from
    ``ValueError`` so that code catching ``ValueError`` keeps working. ``hint`` overrides
    the class's usual hint (``""``: none, when the message already says what to do).

    >>> str(FixqError("bad", hint="")), FixqError("bad", hint="").hint
    ('bad', '')
    """

    def __init__(self, *args, hint: str | None = None):
        super().__init__(*args)
        self.hint = hint


def os_error_reason(e: OSError) -> str:
    """A file-system error in a few words (``read-only file system``, ``a file is in the way``).

    >>> import errno
    >>> os_error_reason(OSError(errno.EROFS, "Read-only file system"))
    'read-only file system'
    """
    import errno
    return {errno.EROFS: "read-only file system", errno.ENOTDIR: "a file is in the way (not a folder)",
            errno.EEXIST: "a file is in the way", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied", errno.ENOSPC: "no space left on the device",
            errno.EISDIR: "it is a folder, not a file", errno.ENOENT: "no such file or folder"}.get(
        e.errno, e.strerror or str(e))
