#!/usr/bin/env python3
"""Manage llamagate API keys; see ``keys/cli.py``. Run ``key_mgmt.py --help``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `keys`
from keys.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
