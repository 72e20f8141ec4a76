"""What every llamagate process does first: read the configuration (exit 2 with
the message on a bad setting), set up logging, and pick the event loop."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable

from core.config import Config, ConfigError, load_config
from core.logs import setup_logging


def config_or_exit(role: str) -> Config:
    try:
        config = load_config(os.environ)
    except ConfigError as exc:
        print(f"llamagate: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    setup_logging(role, config.log_level, config.log_format)
    return config


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (faster sockets on the token path), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
