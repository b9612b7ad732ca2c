"""The errors a user can cause: reported by the CLI as one line, exit code 2, before any work is done."""


class UserError(Exception):
    """A problem in what the user gave (path, key, value): reported as one line, exit code 2."""


class StorageError(UserError):
    """The disk refused a write (full, read-only, quota): one line, the previous files are left intact."""
