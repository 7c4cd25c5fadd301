"""`python -m edgeprune ...` is the `edgeprune` command."""

import sys

from .cli import main

sys.exit(main())
