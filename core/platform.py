"""Which hosting platform we run on, told from its environment variables and files.

Serverless platforms mount their persistent volume at different places, so the
platform decides the default DATA_DIR. `root` is injectable so tests can fake a
container's filesystem in a temp folder.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from pathlib import Path


class Platform(str, enum.Enum):
    RUNPOD_SERVERLESS = "runpod-serverless"
    RUNPOD_POD = "runpod-pod"
    VASTAI = "vastai"
    LAMBDA = "lambda"
    DOCKER = "docker"
    BARE_METAL = "bare-metal"


def detect_platform(environ: Mapping[str, str], root: Path = Path("/")) -> Platform:
    forced = environ.get("PLATFORM", "").strip().lower()
    if forced:
        try:
            return Platform(forced)
        except ValueError:
            pass  # an unknown name falls back to detection; the banner shows the result
    if environ.get("RUNPOD_ENDPOINT_ID") or environ.get("RUNPOD_SERVERLESS"):
        return Platform.RUNPOD_SERVERLESS
    if environ.get("RUNPOD_POD_ID"):
        return Platform.RUNPOD_POD
    if environ.get("VAST_CONTAINERLABEL") or environ.get("CONTAINER_ID") and (root / "workspace").is_dir():
        return Platform.VASTAI
    if environ.get("LAMBDA_INSTANCE_ID") or (root / "etc/lambda-stack-version").exists() \
            or (root / "home/ubuntu/.lambda").exists():
        return Platform.LAMBDA
    if (root / ".dockerenv").exists() or (root / "run/.containerenv").exists():
        return Platform.DOCKER
    return Platform.BARE_METAL


def default_data_dir(platform: Platform) -> str:
    return {
        Platform.RUNPOD_SERVERLESS: "/runpod-volume",
        Platform.RUNPOD_POD: "/workspace",
        Platform.VASTAI: "/workspace",
        Platform.LAMBDA: "/data",
        Platform.DOCKER: "/data",
        Platform.BARE_METAL: "data",
    }[platform]
