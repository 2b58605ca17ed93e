"""What every entry point shares: flag parsing and bad input reported as one line, exit 1."""

import sys
from typing import Callable

from absl import app, flags

from bmnas_jax.errors import InputError


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a bad flag, a missing or broken config file and an override of
  a key the config does not have reported as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e))
  except OSError as e:           # config_flags: the config file is missing or unreadable
    _fail(str(e).splitlines()[0] + (f" ({argv[1:]})" if len(argv) > 1 else ""))
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections: `--config.a.b=v` for a key the config lacks, or a value of the wrong
    # type; its message names the key (and suggests the nearest one).
    text = str(e.args[0] if e.args else e).replace("\n", " ").strip("'\"")
    _fail(f"bad config override: {text}")
  return []


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)`; an `InputError` (bad config key, file, data) becomes one line on
  stderr and exit status 1. Other exceptions are bugs and keep their traceback."""

  def guarded(argv):
    try:
      main(argv)
    except InputError as e:
      _fail(f"{type(e).__name__}: {e}")

  app.run(guarded, flags_parser=_parse_flags)
