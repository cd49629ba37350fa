"""`python -m rwkvstate.cli`: the same as the `rwkvstate` command."""

import sys

from . import main

sys.exit(main())
