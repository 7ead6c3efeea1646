"""The `sinkstream` command: the composition root, the only code that starts a server or runs the core
in-process. Importing it never imports torch (commands load the server and the core when they run)."""

from sinkstream.clients.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
