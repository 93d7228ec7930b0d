"""The one way a command-line entry point ends on a known error: `error: <message>`
on stderr, one line per message, no traceback, exit status 2 for usage and config
errors, 1 for errors of the run (data, media, checkpoints).

  if __name__ == "__main__":
    cli.run(lambda: app.run(main))       # absl: app.run's flags parsing happens inside
    cli.run(lambda: main(sys.argv[1:]))  # argparse

`--debug` on the command line (removed from sys.argv before `main` runs) or
LLAMAVID_DEBUG=1 re-raises instead, traceback and all.

The error classes are named here by module and class, not imported: a class counts
only once its module has been imported (a module nobody imported raised nothing),
so this module imports nothing of the project and any layer may use it.
`ConfigError` lives here because every CLI layer raises it.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn

USAGE = 2   # exit status: the command line or the config cannot run
FAILED = 1  # exit status: the run started and stopped on bad data, media or files


class ConfigError(ValueError):
  """A config that cannot run. Holds every problem found (`messages`), each naming
  its key ("config.batch_size=0: must be a positive integer"); str() joins them with '; '."""

  def __init__(self, *messages: str):
    self.messages = [str(m) for m in messages] or ["invalid config"]
    super().__init__("; ".join(self.messages))


# "module:Class" -> exit status. Subclasses count (MRO), so SubtitleError is a MovieError.
ERRORS: dict[str, int] = {
    "llamavid_jax.cli:ConfigError": USAGE,
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
  """The exit status `run` gives `e` (USAGE or FAILED), None for an error it does not
  know (a bug: that one keeps its traceback)."""
  names = {f"{c.__module__}:{c.__qualname__}" for c in type(e).__mro__}
  return next((code for name, code in ERRORS.items() if name in names and _loaded(name)), None)


def _loaded(name: str) -> bool:
  module = name.split(":")[0]
  return module == "builtins" or module in sys.modules


def messages(e: BaseException) -> list[str]:
  """The lines `run` prints for `e` (without "error: ")."""
  return list(getattr(e, "messages", None) or [str(e) or type(e).__name__])


def run(main: Callable[[], int | None], *, debug_env: str = "LLAMAVID_DEBUG") -> NoReturn:
  """Calls `main()` and exits with its return value; a known error (`ERRORS`) prints
  `error: <message>` lines on stderr and exits 2 (usage, config) or 1 (the run's data,
  media, checkpoints). `--debug` in sys.argv (taken out before `main` runs) or
  `<debug_env>=1` lets every error through with its traceback."""
  debug = os.environ.get(debug_env, "") not in ("", "0")
  if "--debug" in sys.argv[1:]:
    sys.argv[1:] = [a for a in sys.argv[1:] if a != "--debug"]
    debug = True
  try:
    sys.exit(main())
  except Exception as e:   # noqa: BLE001 - unknown errors are re-raised below
    code = exit_code(e)
    if debug or code is None:
      raise
    sys.stdout.flush()
    for line in messages(e):
      print(f"error: {line}", file=sys.stderr)
    sys.stderr.flush()
    sys.exit(code)
