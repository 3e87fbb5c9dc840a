"""Loading: the file (or the embedded defaults) validated section by section into a ``Config``."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dicomnode.config._checks import (
    _ae_title,
    _bool,
    _choice,
    _float,
    _int,
    _list,
    _optional_path,
    _path,
    _section,
    _str,
    _text,
)
from dicomnode.config.destinations import _destinations
from dicomnode.config.model import (
    CONFIG_ENV,
    DEFAULT_CONFIG_NAME,
    DEFAULTS,
    AuditConfig,
    Config,
    DeliveryConfig,
    HttpConfig,
    ModelsConfig,
    NodeConfig,
    RetentionConfig,
    StorageConfig,
    StudiesConfig,
    TLSConfig,
    WorkerConfig,
)
from dicomnode.config.routes import _routes
from dicomnode.errors import ConfigurationError


def default_config_path() -> Path:
    """``$DICOMNODE_CONFIG`` when set, else ``./config.toml``."""
    return Path(os.environ.get(CONFIG_ENV, DEFAULT_CONFIG_NAME))


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate a configuration file.

    ``path=None`` means the default location; when nothing is there the embedded defaults apply.
    An explicitly named file that does not exist is an error.
    """
    explicit = path is not None
    config_path = Path(path) if path is not None else default_config_path()
    if not config_path.exists():
        if explicit or CONFIG_ENV in os.environ:
            raise ConfigurationError("config", f"configuration file {config_path} does not exist")
        return config_from_mapping({}, base_dir=Path.cwd(), source=None)
    try:
        data = tomllib.loads(config_path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError("config", f"{config_path} is not valid TOML: {exc}") from exc
    return config_from_mapping(data, base_dir=config_path.resolve().parent, source=config_path.resolve())


def config_from_mapping(data: Mapping[str, Any], *, base_dir: Path, source: Path | None = None) -> Config:
    """Validate a parsed TOML mapping (missing keys take the embedded defaults)."""
    known = set(DEFAULTS)
    for key in data:
        if key not in known:
            raise ConfigurationError(key, f"unknown section; expected one of {sorted(known)}")
    node = _section(data, "node")
    storage = _section(data, "storage")
    studies = _section(data, "studies")
    models = _section(data, "models")
    worker = _section(data, "worker")
    delivery = _section(data, "delivery")
    logging_ = _section(data, "logging")
    http = _section(data, "http")
    audit = _section(data, "audit")
    retention = _section(data, "retention")

    storage_path = _path(storage, "storage.path", base_dir)
    database_url = _str(storage, "storage.database_url")
    if database_url.startswith("sqlite:///") and not database_url.startswith("sqlite:////"):
        relative = database_url.removeprefix("sqlite:///")
        if relative and relative != ":memory:":
            database_url = "sqlite:///" + str((base_dir / relative).resolve())
    synchronous = _str(storage, "storage.sqlite_synchronous").upper()
    if synchronous not in ("AUTO", "FULL", "NORMAL", "EXTRA"):
        raise ConfigurationError("storage.sqlite_synchronous", "must be AUTO, FULL, EXTRA or NORMAL")

    ae_title = _ae_title(node["ae_title"], "node.ae_title")
    allowed = tuple(
        _ae_title(v, f"node.allowed_calling_ae_titles[{i}]")
        for i, v in enumerate(_list(node, "node.allowed_calling_ae_titles"))
    )
    config = Config(
        source=source,
        node=NodeConfig(
            ae_title=ae_title,
            host=_str(node, "node.host"),
            port=_int(node, "node.port", 0, 65535),
            allowed_calling_ae_titles=allowed,
            max_associations=_int(node, "node.max_associations", 1, 1000),
            min_free_disk_mb=_int(node, "node.min_free_disk_mb", 0, 2**40),
            max_pdu_size=_int(node, "node.max_pdu_size", 0, 2**31 - 1),
            listener_processes=_int(node, "node.listener_processes", 1, 64),
            instance_name=_instance_name(node["instance_name"]),
            tls=_tls(node["tls"], base_dir),
            max_pending_connections=_int(node, "node.max_pending_connections", 0, 100000),
            artim_timeout_seconds=_float(node, "node.artim_timeout_seconds", 0.1, 3600.0),
            network_timeout_seconds=_float(node, "node.network_timeout_seconds", 1.0, 86400.0),
            transfer_syntax_preference=_choice(
                node, "node.transfer_syntax_preference", ("sender", "uncompressed")
            ),
        ),
        storage=StorageConfig(
            path=storage_path,
            database_url=database_url,
            sqlite_synchronous=synchronous,
            flush=_choice(storage, "storage.flush", ("syncfs", "fsync")),
        ),
        studies=StudiesConfig(
            stable_after_seconds=_float(studies, "studies.stable_after_seconds", 0.0, 86400.0),
            stat_calling_ae_titles=tuple(
                _ae_title(v, "studies.stat_calling_ae_titles")
                for v in _list(studies, "studies.stat_calling_ae_titles")
            ),
            priority_aging_seconds=_float(studies, "studies.priority_aging_seconds", 0.0, 86400.0 * 7),
        ),
        models=ModelsConfig(path=_path(models, "models.path", base_dir)),
        worker=WorkerConfig(
            processes=_int(worker, "worker.processes", 1, 64),
            job_timeout_seconds=_float(worker, "worker.job_timeout_seconds", 1.0, 86400.0),
            max_attempts=_int(worker, "worker.max_attempts", 1, 100),
            decode_timeout_seconds=_float(worker, "worker.decode_timeout_seconds", 0.1, 3600.0),
            max_batch_size=_int(worker, "worker.max_batch_size", 1, 4096),
            poll_interval_seconds=_float(worker, "worker.poll_interval_seconds", 0.01, 60.0),
            lease_seconds=_float(worker, "worker.lease_seconds", 1.0, 86400.0),
            device=_choice(worker, "worker.device", ("auto", "cpu", "cuda")),
            nice=_int(worker, "worker.nice", 0, 19),
            cpu_policy=_choice(worker, "worker.cpu_policy", ("batch", "idle", "normal")),
        ),
        routes=_routes(data.get("routes", DEFAULTS["routes"])),
        delivery=DeliveryConfig(
            retry_initial_seconds=_float(delivery, "delivery.retry_initial_seconds", 0.0, 86400.0),
            retry_max_seconds=_float(delivery, "delivery.retry_max_seconds", 0.0, 86400.0 * 7),
            give_up_after_hours=_float(delivery, "delivery.give_up_after_hours", 0.0, 24.0 * 365),
            poll_interval_seconds=_float(delivery, "delivery.poll_interval_seconds", 0.01, 60.0),
            timeout_seconds=_float(delivery, "delivery.timeout_seconds", 1.0, 3600.0),
            commitment_timeout_seconds=_float(
                delivery, "delivery.commitment_timeout_seconds", 1.0, 86400.0 * 7
            ),
            commitment_wait_seconds=_float(delivery, "delivery.commitment_wait_seconds", 0.0, 600.0),
        ),
        destinations=_destinations(data.get("destinations", DEFAULTS["destinations"]), base_dir),
        log_level=_choice(logging_, "logging.level", ("DEBUG", "INFO", "WARNING", "ERROR")),
        http=_http(http, base_dir),
        audit=AuditConfig(
            enabled=_bool(audit, "audit.enabled"),
            path=_optional_path(audit, "audit.path", base_dir),
            syslog_host=_text(audit, "audit.syslog_host"),
            syslog_port=_int(audit, "audit.syslog_port", 1, 65535),
            syslog_ca_certificates=_optional_path(audit, "audit.syslog_ca_certificates", base_dir),
        ),
        retention=RetentionConfig(
            delete_after_days=_float(retention, "retention.delete_after_days", 0.0, 36500.0),
            high_watermark_percent=_float(retention, "retention.high_watermark_percent", 1.0, 100.0),
            interval_seconds=_float(retention, "retention.interval_seconds", 1.0, 86400.0 * 7),
        ),
    )
    _check_worker(config.worker)
    if config.delivery.retry_max_seconds < config.delivery.retry_initial_seconds:
        raise ConfigurationError("delivery.retry_max_seconds", "must not be below retry_initial_seconds")
    return config


def _check_worker(worker: WorkerConfig) -> None:
    """Refuse worker settings that contradict each other (each message names both keys)."""
    if worker.job_timeout_seconds <= worker.decode_timeout_seconds:
        raise ConfigurationError(
            "worker.job_timeout_seconds",
            f"must exceed worker.decode_timeout_seconds ({worker.job_timeout_seconds:g} <= "
            f"{worker.decode_timeout_seconds:g}): a batch deadline shorter than one image's decode "
            "limit fails every job of the batch when one image hangs",
        )


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def _http(section: Mapping[str, Any], base_dir: Path) -> HttpConfig:
    """``[http]``; a host other than loopback without a token is refused (the API would be open)."""
    config = HttpConfig(
        enabled=_bool(section, "http.enabled"),
        host=_str(section, "http.host"),
        port=_int(section, "http.port", 0, 65535),
        token_file=_optional_path(section, "http.token_file", base_dir),
        stow_max_request_mb=_int(section, "http.stow_max_request_mb", 1, 1024 * 1024),
    )
    if config.enabled and config.host not in LOOPBACK_HOSTS and config.token_file is None:
        raise ConfigurationError(
            "http.token_file",
            f"http.host {config.host!r} is not loopback: set http.token_file (a file holding the bearer "
            "token) or serve on 127.0.0.1",
        )
    return config


def _instance_name(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 64 or any(ord(c) < 0x21 or ord(c) > 0x7E for c in value):
        raise ConfigurationError(
            "node.instance_name",
            f"must be printable ASCII without spaces, at most 64 characters; got {value!r}",
        )
    return value


def _tls(value: Any, base_dir: Path) -> TLSConfig | None:
    """``[node.tls]``: absent or empty means plain TCP; certificate and key are then both required."""
    if not isinstance(value, Mapping):
        raise ConfigurationError("node.tls", "must be a table")
    if not value:
        return None
    allowed = ("certificate", "private_key", "ca_certificates")
    for key in value:
        if key not in allowed:
            raise ConfigurationError(f"node.tls.{key}", f"unknown key; expected one of {list(allowed)}")
    paths: dict[str, Path] = {}
    for key in allowed:
        if key not in value:
            if key == "ca_certificates":
                continue
            raise ConfigurationError(f"node.tls.{key}", "is required when [node.tls] is present")
        path = _path(value, f"node.tls.{key}", base_dir)
        if not path.is_file():
            raise ConfigurationError(f"node.tls.{key}", f"file {path} does not exist")
        paths[key] = path
    return TLSConfig(paths["certificate"], paths["private_key"], paths.get("ca_certificates"))
