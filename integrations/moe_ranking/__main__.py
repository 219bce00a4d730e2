"""``python -m integrations.moe_ranking {fit,demo}``: see :mod:`integrations.moe_ranking.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
