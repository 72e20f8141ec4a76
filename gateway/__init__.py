"""The gateway tier: the OpenAI-compatible edge in front of the backend."""

from gateway.native import use_native

use_native()
