"""Configuration: TOML loaded once, validated into frozen dataclasses, passed explicitly.

Every error names the offending key (``node.port: must be an integer between 0 and 65535``), so an
operator can fix the file without reading code. Relative paths resolve against the folder of the
configuration file; with no file at all, the embedded defaults (the repository's ``config.toml``)
apply relative to the working directory.

The package: ``model`` (the dataclasses and the embedded defaults), ``_checks`` (typed readers),
``routes``, ``destinations`` and ``load`` (the file, every other section, the cross-key checks).
Everything public is re-exported here; import it from ``dicomnode.config``.
"""

from __future__ import annotations

from dicomnode.config.destinations import DICOMWEB_DESTINATION_KEYS
from dicomnode.config.load import LOOPBACK_HOSTS, config_from_mapping, default_config_path, load_config
from dicomnode.config.model import (
    CONFIG_ENV,
    DEFAULT_CONFIG_NAME,
    DEFAULTS,
    ROUTE_LIST_KEYS,
    ROUTE_REGEX_KEYS,
    AuditConfig,
    Config,
    DeliveryConfig,
    DestinationConfig,
    DestinationTLSConfig,
    HttpConfig,
    ModelsConfig,
    NodeConfig,
    RetentionConfig,
    RouteConfig,
    SeriesRequirement,
    StorageConfig,
    StudiesConfig,
    TLSConfig,
    WorkerConfig,
)
from dicomnode.errors import ConfigurationError

__all__ = [
    "CONFIG_ENV",
    "DEFAULTS",
    "DEFAULT_CONFIG_NAME",
    "DICOMWEB_DESTINATION_KEYS",
    "LOOPBACK_HOSTS",
    "ROUTE_LIST_KEYS",
    "ROUTE_REGEX_KEYS",
    "AuditConfig",
    "Config",
    "ConfigurationError",
    "DeliveryConfig",
    "DestinationConfig",
    "DestinationTLSConfig",
    "HttpConfig",
    "ModelsConfig",
    "NodeConfig",
    "RetentionConfig",
    "RouteConfig",
    "SeriesRequirement",
    "StorageConfig",
    "StudiesConfig",
    "TLSConfig",
    "WorkerConfig",
    "config_from_mapping",
    "default_config_path",
    "load_config",
]
