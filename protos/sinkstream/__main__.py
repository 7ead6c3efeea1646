"""`python -m sinkstream`: the command line."""

import sys

from sinkstream.clients.cli import main

sys.exit(main())
