"""The `ct2x` command line: one module per subcommand (`ct2x.cli.drr`, ...), dispatched by `ct2x.cli.main`."""

from __future__ import annotations
