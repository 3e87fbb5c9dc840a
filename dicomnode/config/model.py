"""The configuration's frozen dataclasses and the embedded defaults they are read against."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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
