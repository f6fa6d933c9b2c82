"""`python -m server`: the `orders-server` command, for an environment without its console script."""

import sys

from server.main import main

sys.exit(main())
