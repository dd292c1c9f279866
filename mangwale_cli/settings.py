"""Server settings: one typed object, read from flags, then ``MANGWALE_*``, then TOML, then defaults.

Each setting is declared once in ``SPECS`` with its TOML location (``section.key``), its
environment variable and its default. The README's settings table is generated from it, and the
config file is validated against it: an unknown key or a wrong type fails at start-up with a
message naming the file, the key and the value.

Config file structure (``--config FILE``, or ``mangwale.toml`` in the data dir)::

    [server]      host, port, allowed_origins, log_level, shutdown_grace, max_body_size, insecure,
                  ssl_certfile, ssl_keyfile, http
    [websocket]   ping_interval, ping_timeout, max_message_size, client_queue, max_connections,
                  message_rate, message_burst
    [store]       backend, timeout, prefix, idempotency_ttl, snapshot_records, segment_bytes,
                  flush_interval (deprecated)
    [events]      retention, log_retention, fsync_interval
    [runner]      concurrency, max_attempts, kill_grace, sample_dataset, stall_after, log_lines, lease, labels
    [retention]   max_age_days, max_finished, interval
    [artifacts]   max_size, dir
    [workers]     forget_after, update_retention

Later sections (``[trainers.<kind>]``, ``[auth]``) extend this file; they never fork it. Their
scalar keys that have a spec here (``auth.tokens_file``) are settings like any other; the rest of
the section (``[auth.tokens]``) is kept in ``extra`` and validated by the module that owns it
(``tokens.load_tokens``).
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_PORT = 8080
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
CONFIG_NAME = "mangwale.toml"

LOOPBACK_ORIGINS = [
    r"https?://localhost(:\d+)?",
    r"https?://127\.0\.0\.1(:\d+)?",
    r"https?://\[::1\](:\d+)?",
]


def default_home() -> Path:
    """Per-user data dir: ``$MANGWALE_HOME``, else ``$XDG_DATA_HOME/mangwale``, else ~/.local/share."""
    env = os.environ.get("MANGWALE_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "mangwale"


@dataclass(frozen=True)
class Spec:
    name: str  # attribute of Settings
    section: str  # TOML section
    kind: type  # int, float, str, bool or list
    help: str
    minimum: float | None = None
    #: why the setting no longer does what it did: it is still accepted (an old config starts),
    #: and the server says this once at start-up instead of ignoring it silently
    deprecated: str | None = None

    @property
    def env(self) -> str:
        return "MANGWALE_" + self.name.upper()

    @property
    def toml_key(self) -> str:
        prefix = _NAME_PREFIX.get(self.section, self.section + "_")
        return f"{self.section}.{self.name.removeprefix(prefix)}"


_NAME_PREFIX = {"server": "", "websocket": "ws_", "auth": ""}


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    data_dir: Path = field(default_factory=default_home)
    allowed_origins: list[str] = field(default_factory=lambda: list(LOOPBACK_ORIGINS))
    log_level: str = "info"
    shutdown_grace: float = 5.0
    max_body_size: int = 16 * 1024 * 1024
    insecure: bool = False
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    http: str = "httptools"
    tokens_file: str = ""
    ws_ping_interval: float = 30.0
    ws_ping_timeout: float = 20.0
    ws_max_message_size: int = 64 * 1024
    ws_client_queue: int = 1000
    ws_max_connections: int = 10000
    ws_message_rate: float = 5.0
    ws_message_burst: int = 50
    store_backend: str = "tinydb"
    store_flush_interval: float = 0.5
    store_idempotency_ttl: float = 24 * 3600.0
    store_snapshot_records: int = 20_000
    store_segment_bytes: int = 8 * 1024 * 1024
    retention_max_age_days: float = 0.0
    retention_max_finished: int = 0
    retention_interval: float = 3600.0
    store_timeout: float = 5.0
    store_prefix: str = "mangwale:"
    events_retention: int = 100_000
    events_fsync_interval: float = 1.0
    runner_concurrency: int = 2
    runner_max_attempts: int = 3
    runner_kill_grace: float = 3.0
    runner_sample_dataset: bool = True
    runner_stall_after: float = 120.0
    runner_log_lines: int = 10_000
    events_log_retention: int = 10_000
    runner_lease: float = 30.0
    artifacts_max_size: int = 1024**3
    artifacts_dir: str = ""
    runner_labels: list[str] = field(default_factory=list)
    workers_forget_after: float = 3600.0
    workers_update_retention: int = 1000
    process_index: int = 0  # serve --processes: which of the forked instances this is (1..N)
    config_file: Path | None = None
    # Sections later issues add (trainers, auth) are kept raw here until they are read.
    extra: dict[str, Any] = field(default_factory=dict)
    #: one line per setting given that is deprecated or does nothing with this store (logged
    #: once, as a warning, at start-up)
    warnings: list[str] = field(default_factory=list)

    @property
    def shared_store(self) -> bool:
        """True when the store is Redis (several instances may share it)."""
        return self.store_backend != "tinydb"

    @property
    def http_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.ssl_certfile else "http"
        return f"{scheme}://{host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return "ws" + self.http_url.removeprefix("http") + "/ws/training"


SPECS: list[Spec] = [
    Spec("host", "server", str, "address to bind"),
    Spec("port", "server", int, "port for REST and WebSocket", minimum=0),
    Spec("allowed_origins", "server", list, "Origin regexes admitted by CORS and the WebSocket check"),
    Spec("log_level", "server", str, "critical, error, warning, info or debug"),
    Spec("shutdown_grace", "server", float, "seconds running jobs get to stop on shutdown", 0),
    Spec("max_body_size", "server", int, "largest request body in bytes (HTTP 413 above it)", 1),
    Spec("insecure", "server", bool, "allow a non-loopback host with no tokens configured (serve --insecure)"),
    Spec("ssl_certfile", "server", str, "TLS certificate (PEM) to serve https and wss; empty = plain HTTP"),
    Spec("ssl_keyfile", "server", str, "TLS private key (PEM) for ssl_certfile"),
    Spec("http", "server", str, "HTTP/1.1 parser: httptools (16 KiB request-head limit enforced) or h11"),
    Spec("tokens_file", "auth", str, "TOML file with an [auth.tokens] table, read in addition to the config's"),
    Spec("ws_ping_interval", "websocket", float, "seconds between keepalive pings (0 = off)", 0),
    Spec("ws_ping_timeout", "websocket", float, "seconds to wait for a pong before closing", 0),
    Spec("ws_max_message_size", "websocket", int, "largest client message in bytes", 1),
    Spec("ws_client_queue", "websocket", int, "events buffered per client before it is dropped", 1),
    Spec("ws_max_connections", "websocket", int, "WebSocket connections before 503", 1),
    Spec("ws_message_rate", "websocket", float, "client messages per second a connection may sustain (0 = no limit; close 4429 above)", 0),
    Spec("ws_message_burst", "websocket", int, "client messages a connection may send at once before the rate applies", 1),
    Spec("store_backend", "store", str, "'tinydb' (embedded, in the data dir) or a Redis URL (redis://host:6379/0) shared by several instances (serve --store)"),
    Spec("store_flush_interval", "store", float, "deprecated: every write reaches the log at once (see events.fsync_interval)", 0,
         deprecated="store.flush_interval is deprecated and has no effect: every write reaches the store's log at once; "
         "events.fsync_interval bounds how much progress a power loss can cost"),
    Spec("store_idempotency_ttl", "store", float, "seconds an Idempotency-Key is remembered", 1),
    Spec("store_snapshot_records", "store", int, "embedded store: log records between snapshots (fewer: faster start, more writing)", 10),
    Spec("store_segment_bytes", "store", int, "embedded store: size of a log segment (old segments are deleted whole)", 4096),
    Spec("store_timeout", "store", float, "seconds a Redis command may take before the request fails with 503", 0.05),
    Spec("store_prefix", "store", str, "prefix of every Redis key (several deployments can share one Redis)"),
    Spec("events_retention", "events", int, "events the log keeps for replay", 10),
    Spec("events_fsync_interval", "events", float, "embedded store: seconds between fsyncs of progress (creates, cancels and final states are fsynced before they are answered); what a power loss can cost at most", 0),
    Spec("runner_concurrency", "runner", int, "jobs this instance runs at once (0: it runs none and only serves; workers run them)", 0),
    Spec("runner_max_attempts", "runner", int, "attempts before an interrupted job fails", 1),
    Spec("runner_kill_grace", "runner", float, "seconds a cancelled trainer gets before SIGKILL", 0),
    Spec("runner_sample_dataset", "runner", bool, "load the sample dataset into an empty store"),
    Spec("runner_stall_after", "runner", float, "seconds without a report before a job is flagged stalled (0 = off)", 0),
    Spec("runner_log_lines", "runner", int, "log lines kept per job", 1),
    Spec("events_log_retention", "events", int, "job_log lines the event log keeps for replay (apart from retention)", 0),
    Spec("runner_lease", "runner", float, "seconds a runner holds a job's lease without renewing it before its writes are refused and another may take the job over", 0.3),
    Spec("runner_labels", "runner", list, "labels of this instance's own runner: it runs a job only if it has all the job's labels (serve --label)"),
    Spec("workers_forget_after", "workers", float, "seconds a lost worker (its connection gone) stays in GET /workers before it is dropped", 0),
    Spec("workers_update_retention", "workers", int, "Redis store: worker_update messages kept in their own stream for instances that fall behind (apart from events.retention; never replayed to clients)", 1),
    Spec("retention_max_age_days", "retention", float, "delete finished jobs (with their events, logs and files) this many days after they finished (0 = keep)", 0),
    Spec("retention_max_finished", "retention", int, "keep at most this many finished jobs, deleting the oldest (0 = no limit)", 0),
    Spec("retention_interval", "retention", float, "seconds between retention passes", 1),
    Spec("artifacts_max_size", "artifacts", int, "largest artifact upload in bytes (PUT .../artifacts/{name}; HTTP 413 above it)", 1),
    Spec("artifacts_dir", "artifacts", str, "Redis store: a directory every instance mounts, where job files live (Redis keeps a manifest); needed for uploads. Empty: files are published into Redis"),
]
_BY_NAME = {s.name: s for s in SPECS}
_BY_TOML = {s.toml_key: s for s in SPECS}
OPEN_SECTIONS = ("trainers", "auth")  # owned by later modules, validated there
# File settings: a relative path in a config file is relative to that file's directory.
PATH_SETTINGS = frozenset({"tokens_file", "ssl_certfile", "ssl_keyfile", "artifacts_dir"})


_TOML_TYPES: dict[type, tuple[type, ...]] = {int: (int,), float: (int, float), bool: (bool,), str: (str,), list: (list,)}


def _coerce(spec: Spec, value: Any, where: str, *, typed: bool = False) -> Any:
    """Convert a flag/env string (or, with ``typed``, a TOML value that must already have the
    right type) to the setting's type, and check its bounds."""
    if typed and (not isinstance(value, _TOML_TYPES[spec.kind]) or (spec.kind is not bool and isinstance(value, bool))):
        raise ConfigError(
            f"{where}: {spec.toml_key} must be a {spec.kind.__name__}, got {value!r}", field=spec.toml_key
        )
    try:
        if spec.kind is bool:
            if isinstance(value, bool):
                out: Any = value
            elif isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                out = True
            elif isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                out = False
            else:
                raise ValueError
        elif spec.kind is list:
            if isinstance(value, str):
                out = [v.strip() for v in value.split(",") if v.strip()]
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                out = list(value)
            else:
                raise ValueError
        elif spec.kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            out = int(value)
        elif spec.kind is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if not math.isfinite(out):
                raise ValueError
        else:
            if not isinstance(value, str):
                raise ValueError
            out = value
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where}: {spec.toml_key} must be a {spec.kind.__name__}, got {value!r}",
            field=spec.toml_key,
        ) from None
    if spec.minimum is not None and out < spec.minimum:
        raise ConfigError(f"{where}: {spec.toml_key} must be >= {spec.minimum}, got {value!r}", field=spec.toml_key)
    if spec.name == "port" and out > 65535:
        raise ConfigError(f"{where}: server.port must be <= 65535, got {value!r}", field="server.port")
    if spec.name == "log_level" and out not in ("critical", "error", "warning", "info", "debug"):
        raise ConfigError(f"{where}: server.log_level must be one of critical, error, warning, info, debug", field="server.log_level")
    if spec.name == "http" and out not in ("httptools", "h11"):
        raise ConfigError(f"{where}: server.http must be httptools or h11, got {value!r}", field="server.http")
    if spec.name == "store_backend" and out != "tinydb" and not out.startswith(REDIS_SCHEMES):
        raise ConfigError(
            f"{where}: store.backend {out!r} is not supported (use 'tinydb' or a redis:// URL)", field="store.backend"
        )
    return out


def read_config_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flatten a TOML config into (settings by name, open sections). Unknown keys are errors."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist", field="config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}", field="config") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}", field="config") from None
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for section, body in raw.items():
        if section in OPEN_SECTIONS:
            if isinstance(body, dict):  # its keys with a spec are settings; the rest is the owner's
                body = dict(body)
                for key in [k for k in body if f"{section}.{k}" in _BY_TOML]:
                    known = _BY_TOML[f"{section}.{key}"]
                    values[known.name] = _coerce(known, body.pop(key), str(path), typed=True)
            extra[section] = body
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: top-level key {section!r} must be a [section]", field=section)
        for key, value in body.items():
            spec = _BY_TOML.get(f"{section}.{key}")
            if spec is None:
                raise ConfigError(f"{path}: unknown setting {section}.{key}", field=f"{section}.{key}")
            values[spec.name] = _coerce(spec, value, str(path), typed=True)
    for name in PATH_SETTINGS & values.keys():
        if values[name] and not Path(values[name]).expanduser().is_absolute():
            values[name] = str(path.parent / values[name])
    return values, extra


def load(
    flags: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> Settings:
    """Resolve settings: flags (non-None), then MANGWALE_* env, then the config file, then defaults."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = dict(os.environ if env is None else env)

    data_dir = flags.get("data_dir") or env.get("MANGWALE_DATA_DIR") or env.get("MANGWALE_HOME")
    data_dir = Path(data_dir).expanduser() if data_dir else default_home()
    config_file = flags.get("config_file") or env.get("MANGWALE_CONFIG")
    config_path: Path | None = Path(config_file).expanduser() if config_file else None
    if config_path is None and (data_dir / CONFIG_NAME).is_file():
        config_path = data_dir / CONFIG_NAME

    merged: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if config_path is not None:
        merged, extra = read_config_file(config_path)
    for spec in SPECS:
        if spec.env in env:
            merged[spec.name] = _coerce(spec, env[spec.env], f"${spec.env}")
    for name, value in flags.items():
        if name in _BY_NAME:
            merged[name] = _coerce(_BY_NAME[name], value, f"--{name.replace('_', '-')}")
    known = {f.name for f in fields(Settings)}
    warnings = [d for k in merged if k in _BY_NAME and (d := _BY_NAME[k].deprecated)]
    if "events_fsync_interval" in merged and merged.get("store_backend", "tinydb") != "tinydb":
        warnings.append(
            "events.fsync_interval has no effect with a Redis store: its durability is Redis's "
            "appendonly/appendfsync setting (docs/storage.md)"
        )
    return Settings(
        data_dir=data_dir,
        config_file=config_path,
        extra=extra,
        warnings=warnings,
        **{k: v for k, v in merged.items() if k in known},
    )


def settings_table() -> str:
    """Markdown table of every setting, for the README."""
    d = Settings(data_dir=Path("~"))
    rows = ["| config key | environment | default | meaning |", "|---|---|---|---|"]
    for s in SPECS:
        default = getattr(d, s.name)
        if isinstance(default, list):
            default = ", ".join(default)
        rows.append(f"| `{s.toml_key}` | `{s.env}` | `{default}` | {s.help} |")
    return "\n".join(rows)
