"""`python -m ptft`: the `ptft` command, with the same import path as the console script."""

import os
import sys

# `python -m` puts the current directory first on sys.path; the console script never has it.
# Dropped before anything else is imported, so a torch.py or pkg/ lying in the directory of
# someone else's run is never imported. (Under -P / PYTHONSAFEPATH Python adds nothing.)
if not sys.flags.safe_path and sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from ptft.cli import main  # noqa: E402  (after the sys.path fix, on purpose)

if __name__ == "__main__":
    main()
