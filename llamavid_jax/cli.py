"""The one-line error runner of every command-line entry point.

  if __name__ == "__main__":
    cli.run(main)

`run` calls `main()` and exits with its return code (None: 0). The project's own errors
(and missing or unreadable files) print `error: <one line>` on stderr: exit 2 for a
usage or config error (a flag, a config value, an output path), 1 for a run error (a
file, a checkpoint, a request). `--debug` among the arguments, or LLAMAVID_DEBUG=1,
re-raises instead (the traceback).
"""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn

LIMIT = 2000   # characters of an error line


def _is_usage(e: BaseException) -> bool:
  return any(c.__name__ in ("UsageError", "ConfigError") for c in type(e).__mro__)


def _is_ours(e: BaseException) -> bool:
  mods = {c.__module__.split(".")[0] for c in type(e).__mro__}
  return bool(mods & {"llamavid_jax", "eval", "train"}) or isinstance(e, (OSError, ValueError, RuntimeError))


def message(e: BaseException, limit: int = LIMIT) -> str:
  """`e` as one line of at most `limit` characters."""
  text = " ".join(str(e).split()) or type(e).__name__
  if len(text) > limit:
    text = f"{text[:limit]}... ({len(text) - limit:,} more characters)"
  return text


def run(main: Callable[[], int | None], *, debug_env: str = "LLAMAVID_DEBUG") -> NoReturn:
  debug = os.environ.get(debug_env, "") not in ("", "0")
  if "--debug" in sys.argv[1:]:
    sys.argv.remove("--debug")
    debug = True
  try:
    code = main()
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    sys.exit(130)
  except Exception as e:   # noqa: BLE001  (the project's errors, one line each)
    if debug or not _is_ours(e):
      raise
    print(f"error: {message(e)}", file=sys.stderr)
    sys.exit(2 if _is_usage(e) else 1)
  sys.exit(code if isinstance(code, int) else 0)
