"""Configuration: TOML loaded once, validated into frozen dataclasses, passed explicitly.

Every error names the offending key (``node.port: must be an integer between 0 and 65535``), so an
operator can fix the file without reading code. Relative paths resolve against the folder of the
configuration file; with no file at all, the embedded defaults (the repository's ``config.toml``)
apply relative to the working directory.
"""

from __future__ import annotations

import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from dicomnode._toml import Table
from dicomnode.errors import ConfigurationError

CONFIG_ENV = "DICOMNODE_CONFIG"
DEFAULT_CONFIG_NAME = "config.toml"

# The embedded defaults, identical to the repository's config.toml.
DEFAULTS: dict[str, Any] = {
    "node": {
        "ae_title": "DICOMNODE",
        "host": "0.0.0.0",
        "port": 11112,
        "allowed_calling_ae_titles": [],
        "max_associations": 16,
        "min_free_disk_mb": 1024,
        "max_pdu_size": 1048576,
        "max_pending_connections": 0,
        "artim_timeout_seconds": 30,
        "network_timeout_seconds": 60,
        "transfer_syntax_preference": "sender",
        "listener_processes": 1,
        "instance_name": "",
        "tls": {},
    },
    "storage": {
        "path": "var",
        "database_url": "sqlite:///var/dicomnode.db",
        "sqlite_synchronous": "AUTO",
        "flush": "syncfs",
    },
    "studies": {"stable_after_seconds": 10, "stat_calling_ae_titles": [], "priority_aging_seconds": 600},
    "models": {"path": "models"},
    "worker": {
        "processes": 1,
        "job_timeout_seconds": 600,
        "max_attempts": 3,
        "decode_timeout_seconds": 30,
        "max_batch_size": 16,
        "poll_interval_seconds": 0.5,
        "lease_seconds": 60,
        "device": "auto",
        "nice": 10,
        "cpu_policy": "batch",
    },
    "routes": [
        {
            "name": "chest-radiograph",
            "model": "pneumonia-xception",
            "modality": ["CR", "DX"],
            "sop_class_uid": ["1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1"],
            "body_part_examined": ["CHEST", "THORAX"],
            "view_position": ["PA", "AP"],
        }
    ],
    "delivery": {
        "retry_initial_seconds": 5,
        "retry_max_seconds": 300,
        "give_up_after_hours": 72,
        "poll_interval_seconds": 0.5,
        "timeout_seconds": 30,
        "commitment_timeout_seconds": 14400,
        "commitment_wait_seconds": 2,
    },
    "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}],
    "logging": {"level": "INFO"},
    "http": {
        "enabled": True,
        "host": "127.0.0.1",
        "port": 8080,
        "token_file": "",
        "stow_max_request_mb": 2048,
    },
    "audit": {
        "enabled": True,
        "path": "",
        "syslog_host": "",
        "syslog_port": 6514,
        "syslog_ca_certificates": "",
    },
    "retention": {"delete_after_days": 0, "high_watermark_percent": 100, "interval_seconds": 3600},
}

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no control chars
ROUTE_LIST_KEYS = (
    "modality",
    "sop_class_uid",
    "body_part_examined",
    "view_position",
    "image_type",
    "calling_ae_title",
)
ROUTE_REGEX_KEYS = ("series_description",)


@dataclass(frozen=True)
class TLSConfig:
    """DICOM TLS for the listener (PS3.15 B.1 / BCP 195: TLS 1.2 or newer)."""

    certificate: Path
    private_key: Path
    ca_certificates: Path | None  # when set, calling peers must present a certificate it signed


@dataclass(frozen=True)
class NodeConfig:
    """The listener: who we are and whom we accept."""

    ae_title: str
    host: str
    port: int
    allowed_calling_ae_titles: tuple[str, ...]
    max_associations: int
    min_free_disk_mb: int
    max_pdu_size: int
    listener_processes: int = 1
    instance_name: str = ""  # this host's name in leases and `status` (default: hostname)
    tls: TLSConfig | None = None
    max_pending_connections: int = 0  # connections not yet associated; 0 = 2 x max_associations + 8
    artim_timeout_seconds: float = 30.0  # association request (connection to A-ASSOCIATE-RQ), and close
    network_timeout_seconds: float = 60.0  # silence allowed on an established association
    transfer_syntax_preference: str = "sender"  # "sender" (first proposed we accept) or "uncompressed"


@dataclass(frozen=True)
class StorageConfig:
    """Where received instances, results and the database live."""

    path: Path
    database_url: str
    sqlite_synchronous: str
    flush: str = "syncfs"

    @property
    def instances_path(self) -> Path:
        return self.path / "instances"

    @property
    def results_path(self) -> Path:
        return self.path / "results"


@dataclass(frozen=True)
class StudiesConfig:
    """When a study counts as complete."""

    stable_after_seconds: float
    # studies sent by these calling AEs become STAT jobs, claimed before routine ones
    stat_calling_ae_titles: tuple[str, ...] = ()
    # a routine job queued longer than this ranks with STAT jobs, so a STAT stream cannot starve it
    priority_aging_seconds: float = 600.0


@dataclass(frozen=True)
class ModelsConfig:
    """Where model packages live."""

    path: Path


@dataclass(frozen=True)
class WorkerConfig:
    """The inference worker."""

    processes: int
    job_timeout_seconds: float
    max_attempts: int
    decode_timeout_seconds: float
    max_batch_size: int
    poll_interval_seconds: float
    lease_seconds: float
    device: str
    # CPU priority of the worker and its decode/report processes, so that reception stays fast
    # while a model runs or loads: the niceness it raises itself to, and the Linux scheduling policy
    nice: int = 10
    cpu_policy: str = "batch"  # "batch" (SCHED_BATCH), "idle" (SCHED_IDLE) or "normal" (SCHED_OTHER)


@dataclass(frozen=True)
class SeriesRequirement:
    """A route's ``required_series``: the image a study must hold before it may start at once
    (the same match keys as a route, e.g. ``view_position = ["PA"]``)."""

    match: Mapping[str, tuple[str, ...]]
    regex: Mapping[str, str]


@dataclass(frozen=True)
class RouteConfig:
    """One routing rule: which images a model runs on. Absent keys match anything.

    Study completeness (docs/configuration.md): a study holding an image of this route starts at
    once when its requirements are met (``required_series`` and/or ``expected_instances``), else
    after ``[studies] stable_after_seconds`` of quiet, and at the latest ``max_wait_seconds`` after
    its first pending instance.
    """

    name: str
    model: str
    match: Mapping[str, tuple[str, ...]]  # list keys -> accepted values ("" = absent)
    regex: Mapping[str, str]  # regex keys -> pattern (re.search, case-insensitive)
    required_series: SeriesRequirement | None = None
    # instances a complete study holds: a number, or "header" for Number of Study Related Instances
    expected_instances: int | Literal["header"] | None = None
    max_wait_seconds: float | None = None  # the ceiling: start however incomplete
    # models run on the same images for comparison only: findings stored, nothing sent (docs/models.md)
    shadow: tuple[str, ...] = ()
    # "enforce": an image outside its model card's intended population gets no finding;
    # "ignore": analysed anyway, the override recorded (docs/models.md, intended use)
    intended_use: Literal["enforce", "ignore"] = "enforce"

    @property
    def has_requirements(self) -> bool:
        """Whether the route can start a study before it is quiet."""
        return self.required_series is not None or self.expected_instances is not None


@dataclass(frozen=True)
class DeliveryConfig:
    """Retry policy for sending results."""

    retry_initial_seconds: float
    retry_max_seconds: float
    give_up_after_hours: float
    poll_interval_seconds: float
    timeout_seconds: float
    # Storage Commitment: how long a transaction may go unanswered before its objects are resent,
    # and how long the N-ACTION's association stays open for an N-EVENT-REPORT on it
    commitment_timeout_seconds: float = 4 * 3600.0
    commitment_wait_seconds: float = 2.0


@dataclass(frozen=True)
class DestinationConfig:
    """A peer that receives results: by C-STORE (``type = "dimse"``) or by STOW-RS (``"dicomweb"``).

    A DICOMweb destination has an empty ``ae_title``; its ``host`` and ``port`` are those of ``url``
    (for logs and audit messages).
    """

    name: str
    ae_title: str
    host: str
    port: int
    tls: DestinationTLSConfig | None = None
    type: Literal["dimse", "dicomweb"] = "dimse"
    url: str = ""  # dicomweb: the STOW-RS base; results are POSTed to {url}/studies
    token_file: Path | None = None  # dicomweb: a file holding the bearer token
    username: str = ""  # dicomweb: basic authentication, with password_file
    password_file: Path | None = None
    storage_commitment: bool = False  # ask for Storage Commitment (N-ACTION) after delivering


@dataclass(frozen=True)
class DestinationTLSConfig:
    """TLS towards a destination: verify the peer against a CA; present our certificate if given."""

    ca_certificates: Path | None  # None: the system's trusted CAs
    certificate: Path | None
    private_key: Path | None


@dataclass(frozen=True)
class HttpConfig:
    """``[http]``: the dashboard, REST API and metrics server (its own process under ``serve``)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080  # 0: any free port, written to http.json
    token_file: Path | None = None  # bearer token for every path but /healthz; required off loopback
    stow_max_request_mb: int = 2048  # a STOW-RS request larger than this is refused with 413


@dataclass(frozen=True)
class AuditConfig:
    """``[audit]``: PS3.15 A.5 audit messages to an append-only file, optionally to syslog over TLS."""

    enabled: bool = True
    path: Path | None = None  # None: <storage.path>/audit/audit.xml.log
    syslog_host: str = ""  # "" = no syslog collector
    syslog_port: int = 6514
    syslog_ca_certificates: Path | None = None


@dataclass(frozen=True)
class RetentionConfig:
    """``[retention]``: when delivered studies are deleted from the spool."""

    delete_after_days: float = 0.0  # 0 = keep forever
    high_watermark_percent: float = 100.0  # above this disk use, delivered studies go oldest first
    interval_seconds: float = 3600.0


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    source: Path | None
    node: NodeConfig
    storage: StorageConfig
    studies: StudiesConfig
    models: ModelsConfig
    worker: WorkerConfig
    routes: tuple[RouteConfig, ...]
    delivery: DeliveryConfig
    destinations: tuple[DestinationConfig, ...]
    log_level: str = "INFO"
    http: HttpConfig = HttpConfig()
    audit: AuditConfig = AuditConfig()
    retention: RetentionConfig = RetentionConfig()


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


def _bool(section: Mapping[str, Any], key: str) -> bool:
    table, name = _at(section, key)
    return table.boolean(name)


def _text(section: Mapping[str, Any], key: str) -> str:
    """A string that may be empty."""
    table, name = _at(section, key)
    return table.string(name)


def _optional_path(section: Mapping[str, Any], key: str, base_dir: Path) -> Path | None:
    """A path, or None for an empty string."""
    if not _text(section, key):
        return None
    return _path(section, key, base_dir)


def _section(data: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The ``[name]`` table with the embedded defaults filled in; unknown keys are refused."""
    return dict(Table.of(data.get(name), name, defaults=DEFAULTS[name]).data)


# The sections below are read through dicomnode._toml.Table, the one TOML reader; ``key`` is the full
# dotted key ("node.port"), which every error names.


def _at(section: Mapping[str, Any], key: str) -> tuple[Table, str]:
    prefix, _, name = key.rpartition(".")
    return Table(section, prefix), name


def _str(section: Mapping[str, Any], key: str) -> str:
    table, name = _at(section, key)
    return table.string(name, nonempty=True)


def _choice(section: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
    table, name = _at(section, key)
    return table.choice(name, choices)


def _int(section: Mapping[str, Any], key: str, low: int, high: int) -> int:
    table, name = _at(section, key)
    return table.integer(name, low=low, high=high)


def _float(section: Mapping[str, Any], key: str, low: float, high: float) -> float:
    table, name = _at(section, key)
    return table.number(name, low=low, high=high)


def _list(section: Mapping[str, Any], key: str) -> list[Any]:
    table, name = _at(section, key)
    return table.array(name)


def _path(section: Mapping[str, Any], key: str, base_dir: Path) -> Path:
    table, name = _at(section, key)
    return table.path(name, base_dir, resolve=True)


def _instance_name(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 64 or any(ord(c) < 0x21 or ord(c) > 0x7E for c in value):
        raise ConfigurationError(
            "node.instance_name",
            f"must be printable ASCII without spaces, at most 64 characters; got {value!r}",
        )
    return value


def _ae_title(value: Any, key: str) -> str:
    if not isinstance(value, str) or not _AE_TITLE.match(value) or not value.strip():
        raise ConfigurationError(
            key, f"must be a DICOM AE title (1-16 characters, no backslash); got {value!r}"
        )
    return value.strip()


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


def _route_match(item: Mapping[str, Any], where: str) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """The list and regex match keys of a route (or of its ``required_series``)."""
    match: dict[str, tuple[str, ...]] = {}
    for key in ROUTE_LIST_KEYS:
        if key in item:
            values = item[key] if isinstance(item[key], list) else [item[key]]
            if not all(isinstance(v, str) for v in values):
                raise ConfigurationError(f"{where}.{key}", "must be a string or a list of strings")
            match[key] = tuple(v.strip() for v in values)
    regex: dict[str, str] = {}
    for key in ROUTE_REGEX_KEYS:
        if key in item:
            try:
                re.compile(item[key])
            except (re.error, TypeError) as exc:
                raise ConfigurationError(
                    f"{where}.{key}", f"is not a valid regular expression: {exc}"
                ) from exc
            regex[key] = item[key]
    return match, regex


def _shadow_models(item: Mapping[str, Any], where: str) -> tuple[str, ...]:
    """A route's ``shadow`` list: models (``NAME`` or ``NAME@VERSION``) other than its own, once each."""
    raw = item.get("shadow", [])
    if not isinstance(raw, list):
        raise ConfigurationError(
            f"{where}.shadow", 'must be a list of models, e.g. ["pneumonia-xception@0.4"]'
        )
    models: list[str] = []
    for index, name in enumerate(raw):
        key = f"{where}.shadow[{index}]"
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError(key, f"must be a model name (NAME or NAME@VERSION); got {name!r}")
        name = name.strip()
        if name == str(item.get("model", "")).strip():
            raise ConfigurationError(key, f"{name!r} is the route's own model; a shadow must be another one")
        if name in models:
            raise ConfigurationError(key, f"{name!r} is listed twice")
        models.append(name)
    return tuple(models)


def _routes(value: Any) -> tuple[RouteConfig, ...]:
    if not isinstance(value, list):
        raise ConfigurationError("routes", "must be an array of tables ([[routes]])")
    routes = []
    allowed = {
        "name", "model", *ROUTE_LIST_KEYS, *ROUTE_REGEX_KEYS,
        "required_series", "expected_instances", "max_wait_seconds", "shadow", "intended_use",
    }  # fmt: skip
    for i, item in enumerate(value):
        where = f"routes[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigurationError(where, "must be a table")
        for key in item:
            if key not in allowed:
                raise ConfigurationError(f"{where}.{key}", f"unknown key; expected one of {sorted(allowed)}")
        for key in ("name", "model"):
            if key not in item:
                raise ConfigurationError(f"{where}.{key}", "is required")
        match, regex = _route_match(item, where)
        required = None
        if "required_series" in item:
            table = Table.of(item["required_series"], f"{where}.required_series")
            table.check_keys({*ROUTE_LIST_KEYS, *ROUTE_REGEX_KEYS} - {"calling_ae_title"})
            if not table.data:
                raise ConfigurationError(
                    table.prefix, 'must name at least one key (e.g. view_position = ["PA"])'
                )
            required = SeriesRequirement(*_route_match(table.data, table.prefix))
        expected: int | Literal["header"] | None = None
        if "expected_instances" in item:
            raw = item["expected_instances"]
            if raw == "header":
                expected = "header"
            elif isinstance(raw, int) and not isinstance(raw, bool) and raw >= 1:
                expected = raw
            else:
                raise ConfigurationError(
                    f"{where}.expected_instances", f'must be a positive integer or "header"; got {raw!r}'
                )
        top = Table(item, where)
        routes.append(
            RouteConfig(
                name=_str(item, f"{where}.name"),
                model=_str(item, f"{where}.model"),
                match=match,
                regex=regex,
                required_series=required,
                expected_instances=expected,
                max_wait_seconds=top.number("max_wait_seconds", low=0.0, high=86400.0)
                if "max_wait_seconds" in item
                else None,
                shadow=_shadow_models(item, where),
                intended_use=cast(
                    Literal["enforce", "ignore"], top.choice("intended_use", ("enforce", "ignore"), "enforce")
                ),
            )
        )
    names = [r.name for r in routes]
    if len(set(names)) != len(names):
        raise ConfigurationError("routes", "route names must be unique")
    return tuple(routes)


def _destination_tls(value: Any, where: str, base_dir: Path) -> DestinationTLSConfig | None:
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigurationError(where, "must be true or a table (ca_certificates, certificate, private_key)")
    allowed = ("ca_certificates", "certificate", "private_key")
    for key in value:
        if key not in allowed:
            raise ConfigurationError(f"{where}.{key}", f"unknown key; expected one of {list(allowed)}")
    if ("certificate" in value) != ("private_key" in value):
        raise ConfigurationError(f"{where}.private_key", "certificate and private_key go together")
    paths: dict[str, Path] = {}
    for key in allowed:
        if key in value:
            path = _path(value, f"{where}.{key}", base_dir)
            if not path.is_file():
                raise ConfigurationError(f"{where}.{key}", f"file {path} does not exist")
            paths[key] = path
    return DestinationTLSConfig(
        paths.get("ca_certificates"), paths.get("certificate"), paths.get("private_key")
    )


def _storage_commitment(item: Mapping[str, Any], key: str) -> bool:
    """``storage_commitment`` of a destination: true or false, false when absent."""
    value = item.get("storage_commitment", False)
    if not isinstance(value, bool):
        raise ConfigurationError(key, f"must be true or false; got {value!r}")
    return value


def _destinations(value: Any, base_dir: Path) -> tuple[DestinationConfig, ...]:
    if not isinstance(value, list):
        raise ConfigurationError("destinations", "must be an array of tables ([[destinations]])")
    result = []
    for i, item in enumerate(value):
        where = f"destinations[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigurationError(where, "must be a table")
        if item.get("type", "dimse") == "dicomweb":
            result.append(_dicomweb_destination(item, where, base_dir))
            continue
        for key in item:
            if key in DICOMWEB_DESTINATION_KEYS:
                raise ConfigurationError(f"{where}.{key}", 'is only for type = "dicomweb"')
            if key not in ("name", "type", "ae_title", "host", "port", "tls", "storage_commitment"):
                raise ConfigurationError(
                    f"{where}.{key}",
                    "unknown key; expected name, type, ae_title, host, port, tls, storage_commitment",
                )
        if "type" in item:
            _choice(item, f"{where}.type", ("dimse", "dicomweb"))
        for key in ("name", "ae_title", "host", "port"):
            if key not in item:
                raise ConfigurationError(f"{where}.{key}", "is required")
        result.append(
            DestinationConfig(
                name=_str(item, f"{where}.name"),
                ae_title=_ae_title(item["ae_title"], f"{where}.ae_title"),
                host=_str(item, f"{where}.host"),
                port=_int(item, f"{where}.port", 1, 65535),
                tls=_destination_tls(item.get("tls"), f"{where}.tls", base_dir),
                storage_commitment=_storage_commitment(item, f"{where}.storage_commitment"),
            )
        )
    names = [d.name for d in result]
    if len(set(names)) != len(names):
        raise ConfigurationError("destinations", "destination names must be unique")
    return tuple(result)


DICOMWEB_DESTINATION_KEYS = ("url", "token_file", "username", "password_file")


def _dicomweb_destination(item: Mapping[str, Any], where: str, base_dir: Path) -> DestinationConfig:
    """A ``type = "dicomweb"`` destination: a STOW-RS ``url``, bearer or basic credentials, TLS."""
    allowed = ("name", "type", "tls", *DICOMWEB_DESTINATION_KEYS)
    for key in item:
        if key in ("ae_title", "host", "port"):
            raise ConfigurationError(
                f"{where}.{key}", 'is only for type = "dimse"; a DICOMweb peer has a url'
            )
        if key not in allowed:
            raise ConfigurationError(f"{where}.{key}", f"unknown key; expected one of {list(allowed)}")
    for key in ("name", "url"):
        if key not in item:
            raise ConfigurationError(f"{where}.{key}", 'is required for type = "dicomweb"')
    url = _str(item, f"{where}.url").rstrip("/")
    parsed = urllib.parse.urlsplit(url)
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError as exc:
        raise ConfigurationError(f"{where}.url", f"has an invalid port: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigurationError(
            f"{where}.url",
            f"must be an http:// or https:// URL such as http://pacs:8042/dicom-web; got {url!r}",
        )
    if parsed.query or parsed.fragment or parsed.username or parsed.password:
        raise ConfigurationError(
            f"{where}.url", "must not carry a query, fragment or credentials (use token_file or username)"
        )
    tls = _destination_tls(item.get("tls"), f"{where}.tls", base_dir)
    if tls is not None and parsed.scheme != "https":
        raise ConfigurationError(f"{where}.tls", "needs an https:// url")
    if "token_file" in item and ("username" in item or "password_file" in item):
        raise ConfigurationError(
            f"{where}.token_file", "choose bearer (token_file) or basic (username + password_file), not both"
        )
    if ("username" in item) != ("password_file" in item):
        missing = "password_file" if "username" in item else "username"
        raise ConfigurationError(f"{where}.{missing}", "username and password_file go together")
    files: dict[str, Path] = {}
    for key in ("token_file", "password_file"):
        if key in item:
            path = _path(item, f"{where}.{key}", base_dir)
            if not path.is_file():
                raise ConfigurationError(f"{where}.{key}", f"file {path} does not exist")
            files[key] = path
    username = _str(item, f"{where}.username") if "username" in item else ""
    if ":" in username:
        raise ConfigurationError(f"{where}.username", "must not contain a colon (HTTP basic authentication)")
    return DestinationConfig(
        name=_str(item, f"{where}.name"),
        ae_title="",
        host=parsed.hostname,
        port=port,
        tls=tls,
        type="dicomweb",
        url=url,
        token_file=files.get("token_file"),
        username=username,
        password_file=files.get("password_file"),
    )
