"""Optional dependencies of the reference integration: a missing one names the extra to install.

``pub_optim`` itself needs only torch and numpy; this package also needs pandas and pyarrow (data),
pytorch-lightning and torchmetrics (training, metrics) and matplotlib (plots), all in the extra
``pub-optim[integrations]``. The integration runs from a checkout of the repository (the wheel
ships ``pub_optim`` only), so the extra is installed there.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import UserError

EXTRA = "pub-optim[integrations]"
INSTALL = (
    f"it comes with the extra {EXTRA}: in the checkout's top folder run "
    "`pip install -e '.[integrations]'` (or `make setup`, which installs every extra)"
)


class MissingExtraError(UserError, ImportError):
    """An optional dependency of the integration is not installed (the message says how to get
    it); the command line prints it and exits with status 2."""


def missing_extra(module: str, exc: ImportError, purpose: str) -> MissingExtraError:
    """The error to raise ``from exc`` when importing ``module`` failed."""
    error = MissingExtraError(
        f"{purpose} needs the Python package {module!r}, which could not be imported ({exc}); "
        f"{INSTALL}"
    )
    error.name = module
    return error


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise missing_extra(module, exc, purpose) from exc
