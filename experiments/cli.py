"""What every entry point shares: flag parsing and bad input reported as one line, exit 1."""

import sys
from typing import Callable

from absl import app, flags
from ml_collections import config_flags

from bmnas_jax.errors import DISK_ERRNOS, InputError

# ml_collections: `--config.a.b=v` for a key the config lacks, or a value of the wrong type.
_OVERRIDE_ERRORS = (AttributeError, KeyError, TypeError, ValueError)


def usage_error(message: str) -> InputError:
  """A bad combination of flags, reported like any bad input."""
  return InputError(message)


# The one line's length at most: a library's error (orbax, tensorstore) can run to
# pages; the message's head names the file or key at fault.
MAX_LINE = 300


def fail(message: str) -> None:
  """`error: <message>` on one line (a multi-line message's lines joined, cut to
  `MAX_LINE` characters with an ellipsis), exit status 1."""
  text = ""
  for line in (line.strip() for line in str(message).splitlines()):
    if line:
      text += (" " if not text or text.endswith(":") else "; ") + line
  text = f"error:{text}"
  if len(text) > MAX_LINE:
    text = text[:MAX_LINE - 3].rstrip() + "..."
  print(text, file=sys.stderr)
  sys.exit(1)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a bad flag, a missing or broken config file and an override of
  a key the config does not have reported as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e))
  except OSError as e:           # config_flags: the config file is missing or unreadable
    fail(str(e).splitlines()[0] + (f" ({argv[1:]})" if len(argv) > 1 else ""))
  except _OVERRIDE_ERRORS as e:
    _fail_override(e)
  return []


def _fail_override(e: Exception) -> None:
  text = str(e.args[0] if e.args else e)
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
    text = text[1:-1]                     # a KeyError's repr inside the AttributeError
  text = text.replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
  fail(f"bad config override: {text}")   # ml_collections names the key, suggests the nearest


def define_config(default: str | None):
  """`--config`, a config file with `--config.key=value` overrides (ml_collections). Its
  default file is read, and the overrides on the command line applied, right here."""
  try:
    return config_flags.DEFINE_config_file("config", default, "Experiment config file.",
                                           lock_config=True)
  except _OVERRIDE_ERRORS as e:
    _fail_override(e)


def _config_loaded() -> None:
  """A config file that failed to load reports it on first use: here, as one line."""
  if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
    try:
      flags.FLAGS["config"].value.keys()
    except OSError as e:
      fail("cannot load the config file: " + " ".join(str(e).split("\n", 1)[-1].split()))


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)`; an `InputError` (bad config key, file, data), or an OSError of a
  full disk or a missing permission that names its file, becomes one line on stderr and
  exit status 1. Other exceptions are bugs and keep their traceback."""

  def guarded(argv):
    _config_loaded()
    try:
      main(argv)
    except InputError as e:
      fail(f"{type(e).__name__}: {e}")
    except OSError as e:             # disk full, read-only, no permission: not a bug
      if e.errno not in DISK_ERRNOS or not e.filename:
        raise
      fail(f"DataError: {e.filename}: cannot write: {e.strerror or e}")

  app.run(guarded, flags_parser=_parse_flags)
