"""Tests for settings: precedence, the config file, and start-up errors that name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mangwale_cli.errors import ConfigError
from mangwale_cli.settings import (
    CONFIG_NAME,
    LOOPBACK_ORIGINS,
    SPECS,
    Settings,
    load,
    settings_table,
)


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def config_error(
    flags: dict[str, Any] | None = None, env: dict[str, str] | None = None
) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(flags, env=env or {})
    return info.value


def test_defaults(tmp_path: Path) -> None:
    """With nothing set, every setting has its documented default."""
    s = load({}, env={"MANGWALE_DATA_DIR": str(tmp_path)})
    assert s == Settings(data_dir=tmp_path)
    assert (s.host, s.port, s.log_level) == ("127.0.0.1", 8080, "info")
    assert s.allowed_origins == LOOPBACK_ORIGINS and s.config_file is None and s.extra == {}
    assert s.ws_url == "ws://127.0.0.1:8080/ws/training"


def test_data_dir_comes_from_home_when_not_given(tmp_path: Path) -> None:
    """MANGWALE_DATA_DIR beats MANGWALE_HOME; the --data-dir flag beats both."""
    env = {"MANGWALE_HOME": str(tmp_path / "home")}
    assert load({}, env=env).data_dir == tmp_path / "home"
    env["MANGWALE_DATA_DIR"] = str(tmp_path / "dd")
    assert load({}, env=env).data_dir == tmp_path / "dd"
    assert load({"data_dir": tmp_path / "flag"}, env=env).data_dir == tmp_path / "flag"


def test_precedence_flags_env_file_defaults(tmp_path: Path) -> None:
    """A flag beats MANGWALE_* which beats the TOML file which beats the default."""
    cfg = write_config(
        tmp_path / "c.toml",
        '[server]\nport = 9001\nlog_level = "debug"\nhost = "127.0.0.2"\n'
        "[runner]\nconcurrency = 5\n",
    )
    env = {
        "MANGWALE_DATA_DIR": str(tmp_path / "data"),
        "MANGWALE_CONFIG": str(cfg),
        "MANGWALE_PORT": "9002",
        "MANGWALE_LOG_LEVEL": "warning",
    }
    s = load({"port": 9003, "host": None}, env=env)
    assert s.port == 9003  # flag
    assert s.log_level == "warning"  # env over file
    assert s.host == "127.0.0.2"  # file; a None flag counts as not given
    assert s.runner_concurrency == 5  # file
    assert s.runner_max_attempts == 3  # default
    assert s.config_file == cfg
    assert load({}, env=env).port == 9002
    del env["MANGWALE_PORT"]
    assert load({}, env=env).port == 9001


def test_config_in_the_data_dir_is_picked_up(tmp_path: Path) -> None:
    """mangwale.toml in the data dir is read when no config file is named."""
    data = tmp_path / "data"
    cfg = write_config(
        data / CONFIG_NAME, "[websocket]\nclient_queue = 7\n[events]\nretention = 500\n"
    )
    s = load({}, env={"MANGWALE_DATA_DIR": str(data)})
    assert s.config_file == cfg
    assert s.ws_client_queue == 7 and s.events_retention == 500
    other = write_config(tmp_path / "other.toml", "[websocket]\nclient_queue = 9\n")
    assert load({"config_file": other}, env={"MANGWALE_DATA_DIR": str(data)}).ws_client_queue == 9


def test_env_values_are_parsed_by_type(tmp_path: Path) -> None:
    """Env strings become ints, floats, bools and comma-separated lists."""
    env = {
        "MANGWALE_DATA_DIR": str(tmp_path),
        "MANGWALE_WS_CLIENT_QUEUE": "12",
        "MANGWALE_SHUTDOWN_GRACE": "0.5",
        "MANGWALE_RUNNER_SAMPLE_DATASET": "off",
        "MANGWALE_ALLOWED_ORIGINS": "https://a\\.example, https://b\\.example ,",
    }
    s = load({}, env=env)
    assert s.ws_client_queue == 12 and s.shutdown_grace == 0.5 and s.runner_sample_dataset is False
    assert s.allowed_origins == [r"https://a\.example", r"https://b\.example"]


def test_unknown_key_names_the_key(tmp_path: Path) -> None:
    """An unknown key or section in the config file is a ConfigError naming it and the file."""
    cfg = write_config(tmp_path / "c.toml", "[server]\nport = 8081\nprot = 8082\n")
    err = config_error({"config_file": cfg})
    assert err.field == "server.prot" and "server.prot" in err.message and str(cfg) in err.message
    cfg = write_config(tmp_path / "d.toml", "[sever]\nport = 8081\n")
    assert config_error({"config_file": cfg}).field == "sever.port"
    cfg = write_config(tmp_path / "e.toml", "port = 8081\n")
    assert config_error({"config_file": cfg}).field == "port"


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[server]\nport = "abc"\n', "server.port"),
        ("[server]\nport = true\n", "server.port"),
        ("[server]\nport = 80.5\n", "server.port"),
        ("[server]\nhost = 5\n", "server.host"),
        ("[server]\nallowed_origins = 5\n", "server.allowed_origins"),
        ("[server]\nallowed_origins = [1, 2]\n", "server.allowed_origins"),
        ('[server]\nshutdown_grace = "soon"\n', "server.shutdown_grace"),
        ("[server]\nshutdown_grace = nan\n", "server.shutdown_grace"),
        ("[server]\nshutdown_grace = inf\n", "server.shutdown_grace"),
        ('[runner]\nsample_dataset = "maybe"\n', "runner.sample_dataset"),
        ("[runner]\nconcurrency = -1\n", "runner.concurrency"),
        ("[websocket]\nping_interval = -1\n", "websocket.ping_interval"),
        ('[store]\nbackend = "sqlite"\n', "store.backend"),
        ("[events]\nretention = 5\n", "events.retention"),
    ],
)
def test_wrong_type_or_value_in_file_names_the_key(tmp_path: Path, toml: str, key: str) -> None:
    """A value of the wrong type or out of range in the file is a ConfigError naming its key."""
    cfg = write_config(tmp_path / "c.toml", toml)
    err = config_error({"config_file": cfg})
    assert err.field == key and key in err.message


@pytest.mark.parametrize("port", [70000, -1, 65536])
def test_bad_port_everywhere(tmp_path: Path, port: int) -> None:
    """A port outside 0..65535 is refused from the file, the env and a flag."""
    cfg = write_config(tmp_path / "c.toml", f"[server]\nport = {port}\n")
    assert config_error({"config_file": cfg}).field == "server.port"
    assert config_error(env={"MANGWALE_PORT": str(port)}).field == "server.port"
    err = config_error({"port": port})
    assert err.field == "server.port" and str(port) in err.message and "--port" in err.message


def test_port_zero_and_65535_are_allowed() -> None:
    """0 (pick a free port) and 65535 are valid ports."""
    assert load({"port": 0}, env={}).port == 0
    assert load({}, env={"MANGWALE_PORT": "65535"}).port == 65535


@pytest.mark.parametrize("level", ["loud", "INFO ", "", "trace"])
def test_bad_log_level(tmp_path: Path, level: str) -> None:
    """An unknown log level is refused from file, env and flag, naming server.log_level."""
    cfg = write_config(tmp_path / "c.toml", f'[server]\nlog_level = "{level}"\n')
    assert config_error({"config_file": cfg}).field == "server.log_level"
    assert config_error(env={"MANGWALE_LOG_LEVEL": level}).field == "server.log_level"
    assert config_error({"log_level": level}).field == "server.log_level"


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"MANGWALE_PORT": "eighty"}, "server.port"),
        ({"MANGWALE_WS_CLIENT_QUEUE": "1.5"}, "websocket.client_queue"),
        ({"MANGWALE_SHUTDOWN_GRACE": "NaN"}, "server.shutdown_grace"),
        ({"MANGWALE_RUNNER_SAMPLE_DATASET": "perhaps"}, "runner.sample_dataset"),
        ({"MANGWALE_STORE_FLUSH_INTERVAL": "-0.1"}, "store.flush_interval"),
    ],
)
def test_bad_env_value_names_the_key(env: dict[str, str], key: str) -> None:
    """A bad MANGWALE_* value is a ConfigError naming the key and the variable."""
    err = config_error(env=env)
    assert err.field == key
    assert next(iter(env)) in err.message


def test_trainers_and_auth_sections_are_kept_in_extra(tmp_path: Path) -> None:
    """[trainers.*] and [auth] are accepted unvalidated and kept in ``extra``."""
    cfg = write_config(
        tmp_path / "c.toml",
        "[server]\nport = 9100\n[trainers.nlu-train]\nmax_iter = 200\n"
        '[auth]\ntoken_file = "t.txt"\n',
    )
    s = load({"config_file": cfg}, env={})
    assert s.port == 9100
    assert s.extra == {
        "trainers": {"nlu-train": {"max_iter": 200}},
        "auth": {"token_file": "t.txt"},
    }


def test_missing_or_invalid_config_file(tmp_path: Path) -> None:
    """A named config file that is missing or not TOML is a ConfigError naming the file."""
    missing = tmp_path / "nope.toml"
    err = config_error({"config_file": missing})
    assert err.field == "config" and str(missing) in err.message
    broken = write_config(tmp_path / "broken.toml", "[server\nport = \n")
    err = config_error(env={"MANGWALE_CONFIG": str(broken)})
    assert err.field == "config" and str(broken) in err.message


def test_every_setting_is_documented() -> None:
    """Each Settings field but the resolved ones (and serve --processes' own index) has a spec, listed in the README table."""
    names = {s.name for s in SPECS}
    fields = set(Settings.__dataclass_fields__) - {"data_dir", "config_file", "extra", "process_index", "warnings"}
    assert names == fields
    table = settings_table()
    for spec in SPECS:
        assert f"`{spec.toml_key}`" in table and f"`{spec.env}`" in table


def test_readme_documents_every_setting() -> None:
    """The README's settings table names every setting's config key and environment variable."""
    from pathlib import Path

    from mangwale_cli.settings import SPECS

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [s.toml_key for s in SPECS if f"`{s.toml_key}`" not in readme or f"`{s.env}`" not in readme]
    assert not missing, f"README settings table lacks {missing}"


def test_a_deprecated_setting_still_starts_and_says_so(tmp_path: Path) -> None:
    """An old config with store.flush_interval loads (and keeps its value), and the settings
    carry one line saying it no longer does anything and what bounds power-loss cost now."""
    cfg = write_config(tmp_path / "old.toml", "[store]\nflush_interval = 0.05\n[events]\nfsync_interval = 0.3\n")
    s = load({"config_file": cfg}, env={"MANGWALE_DATA_DIR": str(tmp_path)})
    assert s.store_flush_interval == 0.05 and s.events_fsync_interval == 0.3
    assert len(s.warnings) == 1
    assert "store.flush_interval is deprecated" in s.warnings[0] and "events.fsync_interval" in s.warnings[0]
    assert load({}, env={"MANGWALE_DATA_DIR": str(tmp_path)}).warnings == []
    assert load({}, env={"MANGWALE_STORE_FLUSH_INTERVAL": "1"}).warnings == s.warnings


def test_fsync_interval_with_a_redis_store_says_it_does_nothing(tmp_path: Path) -> None:
    """events.fsync_interval set while the store is Redis: one start-up warning saying it does
    nothing there (Redis's appendfsync decides); not set, or on the embedded store, none."""
    redis = {"MANGWALE_DATA_DIR": str(tmp_path), "MANGWALE_STORE_BACKEND": "redis://127.0.0.1:6379/0"}
    s = load({}, env={**redis, "MANGWALE_EVENTS_FSYNC_INTERVAL": "0.2"})
    assert len(s.warnings) == 1
    assert "events.fsync_interval" in s.warnings[0] and "appendfsync" in s.warnings[0]
    cfg = write_config(tmp_path / "c.toml", "[events]\nfsync_interval = 2\n")
    assert load({"config_file": cfg}, env=redis).warnings == s.warnings
    assert load({}, env=redis).warnings == []
    assert load({}, env={"MANGWALE_DATA_DIR": str(tmp_path), "MANGWALE_EVENTS_FSYNC_INTERVAL": "0.2"}).warnings == []


def test_an_old_config_starts_and_warns_once(server_factory: Any, tmp_path: Path) -> None:
    """A real `mangwale serve` over a data dir whose mangwale.toml still has store.flush_interval
    starts, and its log says so exactly once."""
    data = tmp_path / "old"
    write_config(data / CONFIG_NAME, "[store]\nflush_interval = 0.5\n")
    server = server_factory(data_dir=data)
    server.stop()
    lines = [ln for ln in server.output().splitlines() if "flush_interval" in ln]
    assert len(lines) == 1 and "WARNING" in lines[0] and "deprecated" in lines[0], server.output()


def test_fsync_interval_on_a_redis_server_warns_once(server_factory: Any, redis_server: Any) -> None:
    """A real `mangwale serve --store redis://...` given events.fsync_interval starts and warns,
    once, that the setting does nothing there."""
    server = server_factory(env={"MANGWALE_STORE_BACKEND": redis_server.url, "MANGWALE_EVENTS_FSYNC_INTERVAL": "0.5"})
    server.stop()
    lines = [ln for ln in server.output().splitlines() if "fsync_interval" in ln]
    assert len(lines) == 1 and "WARNING" in lines[0] and "appendfsync" in lines[0], server.output()
