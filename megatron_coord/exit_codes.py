"""Exit codes of every command-line service, and the errors that map to them.

Process managers and scripts act on an exit code, so each one means one thing across the
coordinator, the HTTP front end and the launch scripts (each ``--help`` lists them):

* 0: a requested stop (a client's STOP, or SIGTERM/SIGINT after the drain);
* 1: an internal failure (a bug; also what Python exits with for an uncaught exception);
* 2: a configuration error: bad flags, a port that cannot be bound, missing keys or files
  (argparse's own code for bad flags);
* 3: a lost peer: the coordinator could not be reached or was lost;
* 4 (launch/generate.py only): some prompts could not be served (each one's error is in the
  output).

Under torchrun the agent exits 1 whenever a worker fails; the worker's own code is in its
failure summary (``exitcode: 2``) and the worker prints a one-line ``error: ...`` first.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

OK = 0
INTERNAL_ERROR = 1
CONFIG_ERROR = 2
PEER_LOST = 3
REQUESTS_FAILED = 4

HELP_EPILOG = (
    "exit codes: 0 requested stop; 1 internal failure; 2 configuration error (bad flags, "
    "port taken, missing keys or files); 3 lost peer (coordinator unreachable or lost)"
)
GENERATE_HELP_EPILOG = HELP_EPILOG + "; 4 some prompts failed (their errors are in the output)"


class ConfigurationError(Exception):
    """A setting that cannot work (a taken port, a missing file): exit ``CONFIG_ERROR``."""


class PeerLostError(Exception):
    """The peer this process serves with could not be reached or was lost: exit ``PEER_LOST``."""


def run_main(main: Callable[[], int | None]) -> int:
    """Run a command's ``main`` and turn the errors above into their exit code and one line
    on stderr (the full traceback of anything else is the internal failure's report)."""
    try:
        return main() or OK
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return CONFIG_ERROR
    except PeerLostError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return PEER_LOST
