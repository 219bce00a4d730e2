"""``python -m integrations.moe_ranking {fit,demo}``: see :mod:`integrations.moe_ranking.cli`."""

import sys

from ._extras import MissingExtraError

if __name__ == "__main__":
    try:
        from .cli import main
    except MissingExtraError as exc:  # an optional dependency is missing: say which extra
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(main())
