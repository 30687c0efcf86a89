"""`python -m proxy.cli`: the `memshift` command."""

import sys

from proxy.cli.main import main

sys.exit(main())
