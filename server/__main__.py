"""`python -m graphgrad.server` is `graphgrad serve`."""

import sys

from graphgrad.server.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
