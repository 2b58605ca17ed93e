"""The project's error types for bad input (the entry point reports these as one line).

Everything the user controls and can get wrong raises an `InputError` whose
message names the config key, file, field, modality or tap at fault. Anything
else that goes wrong is a bug and keeps its traceback.
"""

import errno

# An OSError with one of these while writing is the user's to fix (disk full, quota,
# read-only file system, no permission), not a bug.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


class InputError(Exception):
  """Bad input: a config key, a file, a dataset's examples (the message names it)."""


class ConfigError(InputError, ValueError):
  """A config key is missing, mistyped, of the wrong type or out of range."""


class DataError(InputError, ValueError):
  """A dataset, an example, a file or a checkpoint is missing, malformed or inconsistent."""


class WorkdirInUseError(InputError):
  """Another running process holds the workdir's lock (the message names it)."""
