#!/usr/bin/env python3
"""Write the deterministic tiny test model: scripts/make_test_model.py PATH [--seed N]."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llamagate.tiny_model import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
