"""``python -m svdecode_pl.cli``: the ``svdecode`` command."""

import sys

from svdecode_pl.cli.entry import main

sys.exit(main())
