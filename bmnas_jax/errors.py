"""The project's error types for bad input (the entry point reports these as one line).

Everything the user controls and can get wrong raises an `InputError` whose
message names the config key, file, field, modality or tap at fault. Anything
else that goes wrong is a bug and keeps its traceback.
"""


class InputError(Exception):
  """Bad input: a config key, a file, a dataset's examples (the message names it)."""


class ConfigError(InputError, ValueError):
  """A config key is missing, mistyped, of the wrong type or out of range."""


class DataError(InputError, ValueError):
  """A dataset, an example, a file or a checkpoint is missing, malformed or inconsistent."""


class WorkdirInUseError(InputError):
  """Another running process holds the workdir's lock (the message names it)."""
