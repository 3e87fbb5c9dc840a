"""``[[destinations]]``: DIMSE peers (optional TLS, Storage Commitment) and DICOMweb (STOW-RS) peers."""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dicomnode.config._checks import _ae_title, _choice, _int, _path, _str
from dicomnode.config.model import DestinationConfig, DestinationTLSConfig
from dicomnode.errors import ConfigurationError


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
