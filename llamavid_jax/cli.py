"""The one way a command-line entry point ends on a known error: `error: <message>`
on stderr, one line per message, no traceback, exit status 2 for usage and config
errors, 1 for errors of the run (data, media, checkpoints).

  if __name__ == "__main__":
    cli.run(lambda: app.run(main, flags_parser=cli.parse_flags))   # absl (flag errors: one line too)
    cli.run(lambda: main(sys.argv[1:]))                              # argparse

`--debug` on the command line (removed from sys.argv before `main` runs) or
LLAMAVID_DEBUG=1 re-raises instead, traceback and all.

The error classes are named here by module and class, not imported: a class counts
only once its module has been imported (a module nobody imported raised nothing),
so this module imports nothing of the project and any layer may use it.
`ConfigError` lives here because every CLI layer raises it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Callable, NoReturn

USAGE = 2   # exit status: the command line or the config cannot run
FAILED = 1  # exit status: the run started and stopped on bad data, media or files
LIMIT = 2000   # characters of one error line


class ConfigError(ValueError):
  """A config that cannot run. Holds every problem found (`messages`), each naming
  its key ("config.batch_size=0: must be a positive integer"); str() joins them with '; '."""

  def __init__(self, *messages: str):
    self.messages = [str(m) for m in messages] or ["invalid config"]
    super().__init__("; ".join(self.messages))


class UsageError(ValueError):
  """Command-line arguments that cannot run (exit status 2)."""


class ArgumentParser(argparse.ArgumentParser):
  """argparse's parser whose errors (a bad flag, and every `p.error` of a check) are one
  line, `PROG: error: MESSAGE (see --help)`, exit status 2, without argparse's usage block
  (`--help` prints it)."""

  def error(self, message: str) -> NoReturn:
    self.exit(USAGE, f"{self.prog}: error: {' '.join(str(message).split())} (see --help)\n")


def log_to_console(fmt: str = "%(name)s: %(message)s") -> None:
  """A command's logging: libraries' records (orbax's INFO chatter) at WARNING, the
  project's own loggers (`eval`, `llamavid_jax`, `train`) at INFO, in `fmt`."""
  import logging
  logging.basicConfig(level=logging.WARNING, format=fmt)
  for name in ("eval", "llamavid_jax", "train"):
    logging.getLogger(name).setLevel(logging.INFO)


def _last_line(text: str) -> str:
  """The last non-empty line of `text`, without a leading "SomeError: "."""
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  last = lines[-1] if lines else text
  return last.split(": ", 1)[1] if re.match(r"^[\w.]+(Error|Exception): ", last) else last


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for `app.run(main, flags_parser=parse_flags)`, every failure a
  one-line `UsageError`: a bad flag; a config file that fails (ml_collections'
  config_flags puts the file's traceback in the message: its last line is kept) or is
  missing (config_flags reports that only when the config is first read: read here);
  an override of a key the config lacks (`--config.nokey=1`)."""
  from absl import flags
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    if "Traceback (most recent call last)" in text:
      flag = re.match(r"(flag --\S+?): ", text)
      text = (f"{flag.group(1)}: " if flag else "") + _last_line(text)
    raise UsageError(text) from e
  except (AttributeError, KeyError) as e:   # config_flags: an override of a key the config lacks
    key = str(e).strip("\"'")
    arg = next((a for a in argv[1:] if a.startswith("--") and f".{key}" in a.split("=")[0]), None)
    raise UsageError(f"{arg or key}: no such key in the config") from e
  for name in flags.FLAGS:
    f = flags.FLAGS[name]
    if f.present:
      try:
        hasattr(f.value, "keys")   # config_flags' placeholder for a config that failed to load raises
      except OSError as e:
        raise UsageError(f"--{name}: {_last_line(str(e))}") from e
  return rest


# "module:Class" -> exit status. Subclasses count (MRO), so SubtitleError is a MovieError.
ERRORS: dict[str, int] = {
    "llamavid_jax.cli:ConfigError": USAGE,
    "llamavid_jax.cli:UsageError": USAGE,
    "llamavid_jax.extract:UsageError": USAGE,
    "builtins:FileNotFoundError": USAGE,          # an input named on the command line or in the config
    "llamavid_jax.data:DataError": FAILED,
    "llamavid_jax.data:SampleError": FAILED,
    "llamavid_jax.data.features:MovieError": FAILED,
    "llamavid_jax.inference:MediaError": FAILED,
    "llamavid_jax.checkpoint.torch_io:CheckpointFormatError": FAILED,
    "llamavid_jax.checkpoint.torch_io:UnsafePickleError": FAILED,
    "llamavid_jax.checkpoint.stream:ConversionError": FAILED,
    "train.checkpointing:CheckpointSaveError": FAILED,
    "train.train:InferenceExportError": FAILED,
    "eval.judge:JudgeError": FAILED,
}


def exit_code(e: BaseException) -> int | None:
  """The exit status `run` gives `e`: the table above first; then any class of the
  project's own modules named UsageError / ConfigError (USAGE) or any other of its
  classes, an OSError, ValueError or RuntimeError (FAILED); None for anything else
  (a bug: that one keeps its traceback)."""
  names = {f"{c.__module__}:{c.__qualname__}" for c in type(e).__mro__}
  code = next((code for name, code in ERRORS.items() if name in names and _loaded(name)), None)
  if code is not None:
    return code
  if any(c.__name__ in ("UsageError", "ConfigError") for c in type(e).__mro__):
    return USAGE
  ours = {c.__module__.split(".")[0] for c in type(e).__mro__} & {"llamavid_jax", "eval", "train"}
  return FAILED if ours or isinstance(e, (OSError, ValueError, RuntimeError)) else None


def _loaded(name: str) -> bool:
  module = name.split(":")[0]
  return module == "builtins" or module in sys.modules


def messages(e: BaseException) -> list[str]:
  """The lines `run` prints for `e` (without "error: "): one per message, a message's
  own line breaks joined with spaces."""
  lines = [" ".join(l.strip() for l in str(m).splitlines()) or type(e).__name__
           for m in (getattr(e, "messages", None) or [str(e)])]
  return [l if len(l) <= LIMIT else f"{l[:LIMIT]}... ({len(l) - LIMIT:,} more characters)" for l in lines]


def message(e: BaseException, limit: int = LIMIT) -> str:
  """`e` as one line of at most `limit` characters (its messages joined with '; ')."""
  text = "; ".join(messages(e))
  return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} more characters)"


def run(main: Callable[[], int | None], *, debug_env: str = "LLAMAVID_DEBUG") -> NoReturn:
  """Calls `main()` and exits with its return value when that is an exit status (an int;
  None is 0; a result such as a summary dict, which `main` returns for its callers, is 0
  too: `sys.exit(dict)` would print it on stderr and exit 1); a known error (`ERRORS`) prints
  `error: <message>` lines on stderr and exits 2 (usage, config) or 1 (the run's data,
  media, checkpoints). `--debug` in sys.argv (taken out before `main` runs) or
  `<debug_env>=1` lets every error through with its traceback."""
  debug = os.environ.get(debug_env, "") not in ("", "0")
  if "--debug" in sys.argv[1:]:
    sys.argv[1:] = [a for a in sys.argv[1:] if a != "--debug"]
    debug = True
  try:
    status = main()
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    sys.exit(130)
  except Exception as e:   # noqa: BLE001 - unknown errors are re-raised below
    code = exit_code(e)
    if debug or code is None:
      raise
    sys.stdout.flush()
    for line in messages(e):
      print(f"error: {line}", file=sys.stderr)
    sys.stderr.flush()
    sys.exit(code)
  sys.exit(status if isinstance(status, int) and not isinstance(status, bool) else 0)
