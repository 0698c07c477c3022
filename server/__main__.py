"""`python -m graphgrad.server` is `graphgrad serve`."""

import sys

from .cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
