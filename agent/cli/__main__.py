"""``python -m agent.cli``: ``edge-fleet``."""

import sys

from agent.cli.fleet import main

sys.exit(main())
