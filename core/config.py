"""The one place that reads llamagate's settings from the environment.

`load_config(environ)` parses every variable, collects every problem and raises
one `ConfigError` naming each bad variable with the form it accepts. The result
is a frozen `Config`; nothing else in the project reads `os.environ` for settings.
Names match earlier single-model gateways (MODEL_NAME, MODEL_PATH, AUTH_KEYS_FILE…)
so existing deployments switch unchanged.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final, TypeVar

from core import values as kinds
from core.platform import Platform, default_data_dir, detect_platform

T = TypeVar("T")


class ConfigError(ValueError):
    """One or more settings are invalid; `problems` lists them all."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class Config:
    # model and backend
    model_name: str | None = None
    model_path: Path | None = None
    models_dir: Path = Path("data/models")
    data_dir: Path = Path("data")
    llama_server_path: Path | None = None
    backend_url: str | None = None
    backend_api_key: str | None = field(default=None, repr=False)
    # an upstream pool (gateway/upstream/pool.py): more llama-servers, by URL or from a file
    backend_urls: tuple[str, ...] = ()
    backends_file: Path | None = None
    pool_affinity: bool = True
    pool_affinity_margin: int = 2
    port_backend: int = 8080
    ngl: int | None = None
    ctx: int = 4096
    threads: int | None = None
    parallel: int = 4
    extra_args: tuple[str, ...] = ()
    backend_start_timeout: float = 300.0
    backend_stop_grace: float = 10.0
    backend_max_restarts: int = 5
    backend_restart_window: float = 300.0
    backend_sleep_seconds: int = 0
    backend_hang_seconds: float = 5.0
    backend_hang_restart_seconds: float = 60.0
    cache_ram: int | None = None  # MiB; None: derived from the memory limit (backend/memory.py)
    # several models (llama-server router mode) and Hub pulls
    profiles_file: Path = Path("data/profiles.yaml")
    profile: str | None = None
    max_loaded_models: int = 2
    model_ttl_seconds: int = 0
    model_cooldown_seconds: float = 60.0
    # other names for served models (MODEL_ALIASES): (alias, model), "*" for any unknown name
    model_aliases: tuple[tuple[str, str], ...] = ()
    hf_endpoint: str | None = None
    hf_token: str | None = field(default=None, repr=False)
    pull_concurrency: int = 1
    pull_resume: bool = True
    pull_retries: int = 5
    # listeners
    host: str = "0.0.0.0"
    port: int = 8000
    port_health: int = 8001
    gateway_workers: int = 1
    # auth and limits
    auth_enabled: bool = True
    # which header's key counts when a request sends both (RunPod's balancer takes Authorization)
    auth_header: str = "authorization"
    auth_keys_file: Path = Path("data/keys.json")
    metrics_public: bool = False
    backend_metrics_names: str = "prometheus"  # llama-server's families as llamacpp_* (or :*)
    max_requests_per_minute: int = 0
    max_tokens_per_minute: int = 0
    max_concurrent_per_key: int = 0
    auth_failures_per_minute: int = 20
    keys_reload_interval: float = 2.0
    usage_db: Path = Path("data/usage.db")
    usage_flush_interval: float = 1.0
    # a fleet (fleet/): keys, limits, usage and audit in Redis; None: this machine's files
    redis_url: str | None = field(default=None, repr=False)  # may hold a password
    redis_key_prefix: str = "llamagate:"
    redis_failure_mode: str = "open"
    redis_timeout: float = 0.5
    redis_lease_seconds: float = 30.0
    redis_audit_max_entries: int = 100_000
    redis_usage_retention_days: int = 400
    usage_buffer_dir: Path | None = None  # None: beside the usage spools, on local disk
    # gateway edge
    max_body_bytes: int = 10 * 1024 * 1024
    head_timeout: float = 20.0
    max_connections_per_client: int = 256
    write_stall_timeout: float = 60.0
    max_messages: int = 4096
    max_prompt_bytes: int = 4 * 1024 * 1024
    request_timeout: float = 600.0
    stream_to_backend_min_tokens: int = 64
    max_concurrent_requests: int = 0
    max_queue_size: int = 64
    queue_timeout: float = 30.0
    cors_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    log_level: str = "INFO"
    log_format: str = "json"
    log_prompts: bool = False
    # OpenTelemetry's own variable: set, traces and metrics are pushed over OTLP/HTTP (the
    # SDK reads every other OTEL_* variable itself: gateway/observe/otel.py)
    otel_exporter_otlp_endpoint: str | None = None
    # lifecycle
    shutdown_grace_seconds: float = 30.0
    idle_shutdown_seconds: int = 0
    platform: Platform = Platform.BARE_METAL

    @property
    def concurrency_limit(self) -> int:
        """In-flight requests to the backend; defaults to its slot count."""
        return self.max_concurrent_requests or self.parallel

    @property
    def pool(self) -> bool:
        """Several llama-servers behind one gateway (BACKEND_URLS or BACKENDS_FILE)."""
        return bool(self.backend_urls) or self.backends_file is not None

    @property
    def supervise_backend(self) -> bool:
        """The one backend is the llama-server we start (so its context size is ours)."""
        return self.backend_url is None and not self.pool


@dataclass(frozen=True)
class Setting:
    """One setting as `load_config` reads it: what `llamagate serve --help` lists and the
    flags are made from, so that neither can drift from the reader."""

    name: str  # the environment variable
    default: Any  # None: unset (the meaning says what that means)
    form: str  # what it accepts, as a bad value's message says

    @property
    def flag(self) -> str:
        return "--" + self.name.lower().replace("_", "-")

    @property
    def secret(self) -> bool:
        """Environment only: a flag would show the value to anyone who can run `ps`."""
        return self.name.lower() in _SECRET_FIELDS


class _Reader:
    """Parses variables one by one, remembering every problem instead of stopping, and
    each setting it was asked for (`settings()`)."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.env = environ
        self.problems: list[str] = []
        self.seen: dict[str, Setting] = {}

    def note(self, name: str, default: Any, form: str) -> None:
        self.seen.setdefault(name, Setting(name, default, form))

    def text(self, name: str, default: str) -> str:
        self.note(name, default, "text")
        return self.raw(name) or default

    def raw(self, name: str) -> str | None:
        self.note(name, None, "text")
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def parse(self, name: str, conv: Callable[[str], T], default: T, form: str) -> T:
        self.note(name, default, form)
        value = self.raw(name)
        if value is None:
            return default
        try:
            return conv(value)
        except (ValueError, TypeError):
            shown = "(hidden)" if name.lower() in _SECRET_FIELDS else repr(value)  # a password
            self.problems.append(f"{name}={shown}: expected {form}")
            return default

    def integer(self, name: str, default: int, lo: int, hi: int) -> int:
        def conv(v: str) -> int:
            n = int(v)
            if not lo <= n <= hi:
                raise ValueError
            return n

        return self.parse(name, conv, default, f"an integer from {lo} to {hi}")

    def opt_integer(self, name: str, lo: int, hi: int) -> int | None:
        return self.parse(name, lambda v: kinds.bounded_int(v, lo, hi), None,
                          f"an integer from {lo} to {hi}")

    def number(self, name: str, default: float, lo: float, hi: float) -> float:
        def conv(v: str) -> float:
            n = float(v)
            if not lo <= n <= hi:
                raise ValueError
            return n

        return self.parse(name, conv, default, f"a number of seconds from {lo:g} to {hi:g}")

    def boolean(self, name: str, default: bool) -> bool:
        return self.parse(name, kinds.parse_bool, default, "true or false (also 1/0, yes/no, on/off)")

    def choice(self, name: str, default: str, options: tuple[str, ...]) -> str:
        def conv(v: str) -> str:
            if v.lower() not in options:
                raise ValueError
            return v.lower()

        return self.parse(name, conv, default, "one of " + ", ".join(options))

    def port(self, name: str, default: int) -> int:
        return self.integer(name, default, 0, 65535)


_NO_WORDS: tuple[str, ...] = ()
_NO_ALIASES: tuple[tuple[str, str], ...] = ()
# fields kept out of repr() are secrets: environment only, never a flag
_SECRET_FIELDS: Final[frozenset[str]] = frozenset(f.name for f in fields(Config) if not f.repr)


def load_config(environ: Mapping[str, str], root: Path = Path("/")) -> Config:
    """Build the configuration from `environ`; raise ConfigError listing every bad variable."""
    r = _Reader(environ)
    values = _read(r, environ, root)
    if r.problems:
        raise ConfigError(r.problems)
    return Config(**values)


def settings() -> list[Setting]:
    """Every setting in the order `load_config` reads them, with its default and form."""
    r = _Reader({})
    _read(r, {}, Path("/nonexistent"))
    r.note("PLATFORM", None, "one of " + ", ".join(p.value for p in Platform))
    return list(r.seen.values())


def _read(r: _Reader, environ: Mapping[str, str], root: Path) -> dict[str, Any]:
    platform = detect_platform(environ, root)
    data_dir = Path(r.raw("DATA_DIR") or default_data_dir(platform))
    models_dir = Path(r.raw("MODELS_DIR") or data_dir / "models")
    model_path = r.raw("MODEL_PATH")
    server_path = r.raw("LLAMA_SERVER_PATH")
    values: dict[str, Any] = dict(
        model_name=r.raw("MODEL_NAME"),
        model_path=Path(model_path) if model_path else None,
        models_dir=models_dir,
        data_dir=data_dir,
        llama_server_path=Path(server_path) if server_path else None,
        backend_url=r.parse("BACKEND_URL", kinds.url, None, "an http:// or https:// URL"),
        backend_api_key=r.raw("BACKEND_API_KEY"),
        backend_urls=r.parse("BACKEND_URLS", kinds.urls, _NO_WORDS,
                             "a comma list of http:// or https:// URLs, each once"),
        backends_file=kinds.path(r.raw("BACKENDS_FILE")),
        pool_affinity=r.boolean("POOL_AFFINITY", True),
        pool_affinity_margin=r.integer("POOL_AFFINITY_MARGIN", 2, 0, 100_000),
        port_backend=r.port("PORT_BACKEND", 8080),
        ngl=r.opt_integer("NGL", -1, 100000),
        ctx=r.integer("CTX", 4096, 0, 10_000_000),
        threads=r.opt_integer("THREADS", 1, 1024),
        parallel=r.integer("PARALLEL", 4, 1, 256),
        extra_args=r.parse("EXTRA_ARGS", lambda v: tuple(shlex.split(v)), _NO_WORDS, "shell-style words"),
        backend_start_timeout=r.number("BACKEND_START_TIMEOUT", 300.0, 1, 86400),
        backend_stop_grace=r.number("BACKEND_STOP_GRACE", 10.0, 0, 600),
        backend_max_restarts=r.integer("BACKEND_MAX_RESTARTS", 5, 1, 1000),
        backend_restart_window=r.number("BACKEND_RESTART_WINDOW", 300.0, 1, 86400),
        backend_sleep_seconds=r.integer("BACKEND_SLEEP_SECONDS", 0, 0, 10_000_000),
        backend_hang_seconds=r.number("BACKEND_HANG_SECONDS", 5.0, 0.5, 3600),
        backend_hang_restart_seconds=r.number("BACKEND_HANG_RESTART_SECONDS", 60.0, 0, 86400),
        cache_ram=r.opt_integer("CACHE_RAM", -1, 10**9),
        profiles_file=Path(r.raw("PROFILES_FILE") or data_dir / "profiles.yaml"),
        profile=r.raw("PROFILE"),
        max_loaded_models=r.integer("MAX_LOADED_MODELS", 2, 1, 256),
        model_ttl_seconds=r.integer("MODEL_TTL_SECONDS", 0, 0, 10_000_000),
        model_cooldown_seconds=r.number("MODEL_COOLDOWN_SECONDS", 60.0, 0, 86400),
        model_aliases=r.parse("MODEL_ALIASES", kinds.aliases, _NO_ALIASES,
                              "a comma list of NAME=MODEL, each NAME once (NAME * for any other)"),
        hf_endpoint=r.parse("HF_ENDPOINT", kinds.url, None, "an http:// or https:// URL"),
        hf_token=r.raw("HF_TOKEN"),
        pull_concurrency=r.integer("PULL_CONCURRENCY", 1, 1, 16),
        pull_resume=r.boolean("PULL_RESUME", True),
        pull_retries=r.integer("PULL_RETRIES", 5, 0, 100),
        host=r.text("HOST", "0.0.0.0"),
        port=r.port("PORT", 8000),
        port_health=r.port("PORT_HEALTH", 8001),
        gateway_workers=r.integer("GATEWAY_WORKERS", 1, 1, 64),
        auth_enabled=r.boolean("AUTH_ENABLED", True),
        auth_header=r.choice("AUTH_HEADER", "authorization", ("authorization", "x-api-key")),
        auth_keys_file=Path(r.raw("AUTH_KEYS_FILE") or data_dir / "keys.json"),
        metrics_public=r.boolean("METRICS_PUBLIC", False),
        backend_metrics_names=r.choice("BACKEND_METRICS_NAMES", "prometheus",
                                       ("prometheus", "llamacpp")),
        max_requests_per_minute=r.integer("MAX_REQUESTS_PER_MINUTE", 0, 0, 10_000_000),
        max_tokens_per_minute=r.integer("MAX_TOKENS_PER_MINUTE", 0, 0, 10**12),
        max_concurrent_per_key=r.integer("MAX_CONCURRENT_PER_KEY", 0, 0, 100_000),
        auth_failures_per_minute=r.integer("AUTH_FAILURES_PER_MINUTE", 20, 1, 1_000_000),
        keys_reload_interval=r.number("KEYS_RELOAD_INTERVAL", 2.0, 0, 3600),
        usage_db=Path(r.raw("USAGE_DB") or data_dir / "usage.db"),
        usage_flush_interval=r.number("USAGE_FLUSH_INTERVAL", 1.0, 0.05, 1.0),
        redis_url=r.parse("REDIS_URL", kinds.redis_url, None,
                          "a redis://, rediss:// (TLS) or unix:// URL"),
        redis_key_prefix=r.text("REDIS_KEY_PREFIX", "llamagate:"),
        redis_failure_mode=r.choice("REDIS_FAILURE_MODE", "open", ("open", "closed")),
        redis_timeout=r.number("REDIS_TIMEOUT", 0.5, 0.01, 60),
        redis_lease_seconds=r.number("REDIS_LEASE_SECONDS", 30.0, 1, 3600),
        redis_audit_max_entries=r.integer("REDIS_AUDIT_MAX_ENTRIES", 100_000, 100, 10**9),
        redis_usage_retention_days=r.integer("REDIS_USAGE_RETENTION_DAYS", 400, 1, 100_000),
        usage_buffer_dir=kinds.path(r.raw("USAGE_BUFFER_DIR")),
        max_body_bytes=r.integer("MAX_BODY_BYTES", 10 * 1024 * 1024, 1024, 2**31),
        head_timeout=r.number("HEAD_TIMEOUT", 20.0, 0.1, 3600),
        max_connections_per_client=r.integer("MAX_CONNECTIONS_PER_CLIENT", 256, 1, 1_000_000),
        write_stall_timeout=r.number("WRITE_STALL_TIMEOUT", 60.0, 0.1, 86400),
        max_messages=r.integer("MAX_MESSAGES", 4096, 1, 10**7),
        max_prompt_bytes=r.integer("MAX_PROMPT_BYTES", 4 * 1024 * 1024, 1024, 2**31),
        request_timeout=r.number("REQUEST_TIMEOUT", 600.0, 1, 86400),
        stream_to_backend_min_tokens=r.integer("STREAM_TO_BACKEND_MIN_TOKENS", 64, 0, 10**9),
        max_concurrent_requests=r.integer("MAX_CONCURRENT_REQUESTS", 0, 0, 100_000),
        max_queue_size=r.integer("MAX_QUEUE_SIZE", 64, 0, 1_000_000),
        queue_timeout=r.number("QUEUE_TIMEOUT", 30.0, 0.001, 86400),
        cors_origins=r.parse("CORS_ORIGINS", kinds.origins, _NO_WORDS, "a comma list of http(s) origins"),
        trusted_proxies=r.parse("TRUSTED_PROXIES", kinds.proxies, _NO_WORDS,
                                "a comma list of IP addresses or networks (CIDR), or *"),
        log_level=r.choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error")).upper(),
        log_format=r.choice("LOG_FORMAT", "json", ("json", "text")),
        log_prompts=r.boolean("LOG_PROMPTS", False),
        otel_exporter_otlp_endpoint=r.parse("OTEL_EXPORTER_OTLP_ENDPOINT", kinds.url, None,
                                            "an http:// or https:// URL"),
        shutdown_grace_seconds=r.number("SHUTDOWN_GRACE_SECONDS", 30.0, 0, 86400),
        idle_shutdown_seconds=r.integer("IDLE_SHUTDOWN_SECONDS", 0, 0, 10_000_000),
        platform=platform,
    )
    if values["model_path"] is not None and values["backend_url"] is not None:
        r.problems.append("MODEL_PATH and BACKEND_URL: set one, not both (BACKEND_URL serves an "
                          "already running llama-server)")
    if values["model_path"] is not None and values["profile"] is not None:
        r.problems.append("MODEL_PATH and PROFILE: set one, not both (MODEL_PATH serves one model, "
                          "PROFILE the models a profile names)")
    if (values["backend_urls"] or values["backends_file"] is not None) \
            and values["gateway_workers"] > 1:
        r.problems.append("BACKEND_URLS or BACKENDS_FILE with GATEWAY_WORKERS > 1: the upstream "
                          "pool routes and admits in one gateway worker; set GATEWAY_WORKERS=1")
    if (values["backend_urls"] or values["backends_file"] is not None) \
            and values["profile"] is not None:
        r.problems.append("PROFILE with BACKEND_URLS or BACKENDS_FILE: a pool's local "
                          "llama-server serves one model (MODEL_PATH)")
    hang, hang_restart = values["backend_hang_seconds"], values["backend_hang_restart_seconds"]
    if 0 < hang_restart <= hang:
        r.problems.append(f"BACKEND_HANG_RESTART_SECONDS={hang_restart:g}: must be more than "
                          f"BACKEND_HANG_SECONDS ({hang:g}), or 0 for never")
    return values


def setting_names() -> list[str]:
    """Environment variable names behind each Config field (for docs/.env.example checks)."""
    return [f.name.upper() for f in fields(Config) if f.name != "platform"] + ["PLATFORM"]
