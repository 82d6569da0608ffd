"""Import paths in a config read from a run: someone else's run directory must not run code.

`model.name: package.module:builder` imports that module. Named in the user's own config file
or on their command line, that is the point; read from a checkpoint's meta.json it would run
whatever the run's author put on the path. Such names are refused unless the user allows the
module in the environment variable named by `TRUST_ENV`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

TRUST_ENV = "PTFT_TRUSTED_IMPORTS"


@dataclass(frozen=True)
class ImportTrust:
    """Which import paths a config read from a run may name.

    Args:
        names: import paths the user named themselves (command line, their own config file).
    """

    names: frozenset[str] = frozenset()

    def allows(self, name: str) -> bool:
        return name in self.names or name.partition(":")[0] in trusted_modules()

    @staticmethod
    def refusal(name: str) -> str:
        module = name.partition(":")[0]
        return (f"{name!r} would import module {module!r}, named by this file rather than by your own config or "
                f"command line, so ptft does not import it; if you trust that module, allow it with "
                f"{TRUST_ENV}={module} (comma-separated module names)")


def trusted_modules() -> frozenset[str]:
    """The modules listed in the environment variable `TRUST_ENV` (`pkg.mod,other_mod`)."""
    entries = os.environ.get(TRUST_ENV, "").split(",")
    return frozenset(entry.strip().partition(":")[0] for entry in entries if entry.strip())
