"""The ``llmquant`` command: one thin function per verb over the library API.

Each command parses its arguments, calls one library function and renders the result as a rich
table or, with ``--json``, as JSON on stdout. Errors are one line on stderr and exit code 1.
"""

from __future__ import annotations

import signal
import sys

from ..errors import LlmquantError

from .options import app, err

# Each family registers its verbs on import: this order is the order of `llmquant --help`.
from . import quantize  # noqa: E402,F401,I001  inspect, quantize
from . import measure  # noqa: E402,F401  ladder, eval
from . import run  # noqa: E402,F401  run, chat, serve, bench
from . import store  # noqa: E402,F401  pull, list, show, rm
from . import convert  # noqa: E402,F401  convert
from . import fit  # noqa: E402,F401  fit
from . import calib  # noqa: E402,F401  imatrix
from . import calib_hf  # noqa: E402,F401  gptq, awq

__all__ = ["app", "main"]


# -- entry point -----------------------------------------------------------------------------------------
def _on_sigterm(signum, frame):  # let context managers remove partial files
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app()
    except LlmquantError as exc:
        from rich.markup import escape  # a message may hold brackets: pip install 'llmquant[hf]'

        err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
