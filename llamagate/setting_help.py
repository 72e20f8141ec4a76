"""One line of meaning per setting, by section, for `llamagate serve --help`.

The names, defaults and accepted forms come from the reader itself (core.config.settings());
only the meaning is written here. tests/llamagate/test_cli.py fails when a setting is
missing here or one listed here no longer exists: a new setting gets its line in the same
change (docs/configuration.md has the long form).
"""

from __future__ import annotations

from typing import Final

SECTIONS: Final[tuple[tuple[str, dict[str, str]], ...]] = (
    ("model and backend (llama-server)", {
        "MODEL_PATH": "GGUF file to serve (unset: the only .gguf in MODELS_DIR, else the demo model)",
        "MODEL_NAME": "name clients use in \"model\" (unset: the file name without .gguf)",
        "MODELS_DIR": "folder of GGUF files (unset: $DATA_DIR/models)",
        "DATA_DIR": "keys, usage, models (unset: by platform, ./data on bare metal)",
        "LLAMA_SERVER_PATH": "llama-server binary (unset: the `make llama-server` build, then PATH)",
        "BACKEND_URL": "use an already running llama-server instead of starting one",
        "BACKEND_API_KEY": "the key BACKEND_URL's llama-server expects, if any",
        "BACKEND_URLS": "more llama-servers for one pool, comma-separated (routed by load and prompt cache)",
        "BACKENDS_FILE": "YAML list of pool upstreams: url, key, weight, models",
        "POOL_AFFINITY": "send a conversation back to the upstream that holds its prompt cache",
        "POOL_AFFINITY_MARGIN": "requests more in flight than the least loaded before a conversation moves",
        "PORT_BACKEND": "loopback port of the supervised llama-server; 0 picks a free one",
        "NGL": "GPU layers (--n-gpu-layers; unset: llama-server's default)",
        "CTX": "context size in tokens, shared by the parallel slots",
        "THREADS": "CPU threads for llama-server (unset: llama-server's default)",
        "PARALLEL": "parallel slots (concurrent sequences) in llama-server",
        "EXTRA_ARGS": "more llama-server arguments, shell-quoted",
        "BACKEND_START_TIMEOUT": "seconds llama-server may take to load before startup fails",
        "BACKEND_STOP_GRACE": "seconds between SIGTERM and SIGKILL when stopping llama-server",
        "BACKEND_MAX_RESTARTS": "crashes within BACKEND_RESTART_WINDOW that open the circuit breaker",
        "BACKEND_RESTART_WINDOW": "seconds over which BACKEND_MAX_RESTARTS crashes are counted",
        "BACKEND_SLEEP_SECONDS": "idle seconds before llama-server frees the model; 0 = never",
        "BACKEND_HANG_SECONDS": "seconds llama-server's /health may go unanswered before it counts as hung",
        "BACKEND_HANG_RESTART_SECONDS": "seconds unanswered before a hung llama-server restarts; 0 = never",
        "CACHE_RAM": "MiB of prompt cache (--cache-ram); -1 = no limit, 0 = off (unset: by memory)",
    }),
    ("several models and Hub pulls", {
        "PROFILES_FILE": "YAML file of serving profiles (unset: $DATA_DIR/profiles.yaml)",
        "PROFILE": "profile to serve at start (several models, llama-server router mode)",
        "MAX_LOADED_MODELS": "models loaded at once in multi-model mode",
        "MODEL_TTL_SECONDS": "unload a model after this many seconds without requests; 0 = never",
        "MODEL_COOLDOWN_SECONDS": "seconds after a failed load before a request may try that model again",
        "MODEL_ALIASES": "other names for served models, NAME=MODEL,…; *=MODEL for any unknown name",
        "HF_ENDPOINT": "Hugging Face Hub URL for pulls (unset: https://huggingface.co)",
        "HF_TOKEN": "Hub token for gated or private repos",
        "PULL_CONCURRENCY": "Hub downloads running at once",
        "PULL_RESUME": "continue interrupted pulls at start",
        "PULL_RETRIES": "network failures in a row before a pull fails",
    }),
    ("listeners", {
        "HOST": "address the gateway and health ports bind to",
        "PORT": "gateway (OpenAI API)",
        "PORT_HEALTH": "health tier (/ping, /health); equal to PORT: one listener for both",
        "GATEWAY_WORKERS": "gateway processes sharing PORT",
    }),
    ("authentication and limits", {
        "AUTH_ENABLED": "require an API key (off must be explicit)",
        "AUTH_HEADER": "which key header wins when a request sends both",
        "AUTH_KEYS_FILE": "hashed key store (unset: $DATA_DIR/keys.json)",
        "METRICS_PUBLIC": "serve /metrics without a key",
        "BACKEND_METRICS_NAMES": "llama-server's metrics as llamacpp_* (prometheus) or llamacpp:*",
        "MAX_REQUESTS_PER_MINUTE": "default requests per minute per key; 0 = unlimited",
        "MAX_TOKENS_PER_MINUTE": "default tokens per minute per key; 0 = unlimited",
        "MAX_CONCURRENT_PER_KEY": "default concurrent requests per key; 0 = unlimited",
        "AUTH_FAILURES_PER_MINUTE": "failed authentications per minute from one address before 429",
        "TRUSTED_PROXIES": "proxies (addresses, CIDR or *) whose X-Forwarded-For names the client",
        "KEYS_RELOAD_INTERVAL": "seconds between checks of the keys file; 0 = no polling",
        "USAGE_DB": "SQLite database of usage and the audit log (unset: $DATA_DIR/usage.db)",
        "USAGE_FLUSH_INTERVAL": "seconds between batched usage writes",
        "REDIS_URL": "Redis shared by every replica for keys, limits, usage and audit "
                     "(unset: this machine's files)",
        "REDIS_KEY_PREFIX": "prefix of every Redis key llamagate writes",
        "REDIS_FAILURE_MODE": "with Redis unreachable: open (per-replica limits) or closed (503)",
        "REDIS_TIMEOUT": "seconds a round trip to Redis may take before it counts as unreachable",
        "REDIS_LEASE_SECONDS": "lease of a concurrency slot: a dead replica's slots free after it",
        "REDIS_AUDIT_MAX_ENTRIES": "entries the fleet's audit stream keeps",
        "REDIS_USAGE_RETENTION_DAYS": "days of hourly usage kept in Redis",
        "USAGE_BUFFER_DIR": "local directory for usage waiting while Redis is unreachable",
    }),
    ("gateway edge", {
        "MAX_BODY_BYTES": "largest request body in bytes (larger: 413)",
        "HEAD_TIMEOUT": "seconds a client may take to send a request head (then 408)",
        "MAX_CONNECTIONS_PER_CLIENT": "open connections one client address may hold",
        "WRITE_STALL_TIMEOUT": "seconds a client may leave an answer unread before it is cut off",
        "MAX_MESSAGES": "most messages one chat request may carry (more: 400)",
        "MAX_PROMPT_BYTES": "largest prompt in bytes (larger: 413)",
        "REQUEST_TIMEOUT": "seconds a request may take end to end (then 504)",
        "STREAM_TO_BACKEND_MIN_TOKENS": "non-streaming requests from this max_tokens on are streamed from "
                                        "llama-server; 0 = all",
        "MAX_CONCURRENT_REQUESTS": "requests in flight to the backend; 0 = PARALLEL",
        "MAX_QUEUE_SIZE": "requests that may wait for a backend slot (more: 429)",
        "QUEUE_TIMEOUT": "seconds a request may wait for a slot (then 503)",
        "CORS_ORIGINS": "browser origins allowed by CORS; empty = CORS off",
        "LOG_LEVEL": "log level; warning and above also turn the access log off",
        "LOG_FORMAT": "json (one object per line) or text",
        "LOG_PROMPTS": "put prompt text in the access log",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "push traces and metrics over OTLP/HTTP to this "
                                       "collector; unset = off",
    }),
    ("lifecycle", {
        "SHUTDOWN_GRACE_SECONDS": "seconds in-flight requests get to finish after SIGTERM",
        "IDLE_SHUTDOWN_SECONDS": "exit 0 after this many seconds without inference requests; 0 = never",
        "PLATFORM": "force the platform instead of detecting it",
    }),
)
