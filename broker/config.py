"""Settings: defaults from ``config/broker.yaml``, overridden by ``BROKER_*`` environment variables.

The YAML file is data that documents every setting; the model below validates it. Environment
variables win over the file, so containers and the test harness can change one setting at a time.
A bad value stops start-up with one line naming the setting (see :func:`load_settings`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_CONFIG_PATH = Path("config/broker.yaml")


class SettingsError(Exception):
    """A setting is missing or invalid; the message is one line meant for the operator."""


class StartupError(Exception):
    """The broker cannot start; the message is one line for the operator."""


@dataclass(frozen=True)
class Peer:
    """A DICOM node the broker may connect to (``BROKER_DICOM_PEERS``)."""

    ae_title: str
    host: str
    port: int


# Procedure states that may be reported to the RIS, and the ORC-5 order status (HL7 table 0038) sent.
RIS_ORDER_STATUS = {"ARRIVED": "SC", "STARTED": "IP", "COMPLETED": "CM", "DISCONTINUED": "DC",
                    "IMAGES AVAILABLE": "CM", "ARCHIVED": "CM"}


# TLS 1.2 cipher suites of BCP 195 (RFC 9325 section 4.2, as DICOM PS3.15 B.9 asks): forward secrecy
# and AEAD only. TLS 1.3 suites are all acceptable and are not set by this string.
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"


class Settings(BaseSettings):
    """Every setting of the broker, with its default (kept equal to ``config/broker.yaml``)."""

    model_config = SettingsConfigDict(env_prefix="BROKER_", extra="forbid")

    database_url: str = "sqlite:///./var/broker.db"
    redis_url: str = ""

    hl7_host: str = "0.0.0.0"
    hl7_port: int = Field(2575, ge=0, le=65535)  # 0 = no plain MLLP port
    hl7_tls_port: int = Field(0, ge=0, le=65535)  # 0 = no MLLP port with TLS
    hl7_tls_require_client_cert: bool = False
    hl7_max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    hl7_idle_timeout: float = Field(600, gt=0)
    hl7_max_connections: int = Field(200, ge=1)
    hl7_workers: int = Field(8, ge=1, le=256)
    hl7_processes: int = Field(0, ge=0, le=64)
    hl7_group_commit: Literal["auto", "on", "off"] = "auto"
    mappings_dir: Path = Path("mappings")

    ae_title: str = "BROKER"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = Field(11112, ge=0, le=65535)  # 0 = no plain DICOM port
    dicom_tls_port: int = Field(0, ge=0, le=65535)  # 0 = no DICOM port with TLS (2762 by convention)
    dicom_tls_require_client_cert: bool = True
    dicom_tls_ae_certificates: str = ""
    dicom_tls_peers: str = ""
    dicom_max_associations: int = Field(50, ge=1, le=1000)
    dicom_acse_timeout: float = Field(30, gt=0)
    dicom_dimse_timeout: float = Field(30, gt=0)
    dicom_network_timeout: float = Field(60, gt=0)
    dicom_max_pdu: int = Field(65536, ge=0)
    dicom_max_message_bytes: int = Field(16 * 1024 * 1024, ge=65536)
    dicom_tcp_quickack: bool = True
    dicom_processes: int = Field(1, ge=1, le=32)
    dicom_allowed_callers: str = ""
    mwl_station_sees_own_items: bool = False
    mwl_hidden_statuses: str = "STARTED,COMPLETED,CANCELED,DISCONTINUED"
    mwl_pn_case_insensitive: bool = True
    mwl_page_size: int = Field(500, ge=1, le=100_000)
    uid_root: str = ""

    # --- worklist folders (broker.worklist_files): .wl files as scheduled steps ---
    worklist_folders: str = ""  # folders watched by 'broker run', separated by the path separator (:)
    worklist_on_delete: Literal["cancel", "keep"] = "cancel"
    worklist_settle_seconds: float = Field(2, ge=0)
    worklist_scan_interval: float = Field(60, gt=0)
    worklist_delete_guard: float = Field(0.5, ge=0, le=1)

    # --- procedure status pipeline: MPPS, IAN, Storage Commitment, RIS status ---
    dicom_peers: str = ""
    stgcmt_archive_ae: str = ""
    stgcmt_timeout: float = Field(3600, gt=0)
    stgcmt_report_wait: float = Field(5, ge=0)
    ups_shutdown_wait: float = Field(2, ge=0)
    mpps_forward_aes: str = ""
    ris_hl7_address: str = ""
    ris_hl7_tls: bool = False
    ris_status_message_type: Literal["ORM^O01", "OMI^O23", "ORU^R01"] = "ORM^O01"
    ris_status_transitions: str = "STARTED,COMPLETED,DISCONTINUED"
    ris_hl7_ack_timeout: float = Field(10, gt=0)
    event_max_attempts: int = Field(10, ge=1)
    event_backoff_base: float = Field(1, gt=0)
    event_backoff_max: float = Field(300, gt=0)
    event_lease_seconds: float = Field(60, gt=0)
    event_poll_interval: float = Field(0.5, gt=0)
    outbox_vacuum_interval: float = Field(10, ge=0)  # PostgreSQL; 0 = autovacuum only

    # --- cluster: several 'broker run' nodes on one database ---
    node_id: str = ""  # empty = <host name>-<pid>
    cluster_lease_seconds: float = Field(30, gt=0)
    cluster_heartbeat_interval: float = Field(5, gt=0)

    # --- status board and REST API ---
    http_host: str = "0.0.0.0"
    http_port: int = Field(8080, ge=0, le=65535)  # 0 = no plain HTTP server in 'broker run'
    http_tls_port: int = Field(0, ge=0, le=65535)  # 0 = no HTTPS server
    http_tls_require_client_cert: bool = False
    api_tokens: str = ""
    api_tokens_file: str = ""
    timezone: str = ""  # IANA name of the board's zone; empty = the host's
    board_wall_patient: Literal["initials", "full", "none"] = "initials"
    board_wall_id_digits: int = Field(4, ge=0, le=20)
    board_start_late_minutes: float = Field(15, gt=0)
    board_expected_minutes: str = "CT=30,MR=60,US=30,CR=15,DX=15,MG=30,NM=60,PT=90,XA=60,RF=45,*=45"
    board_images_minutes: float = Field(30, gt=0)

    # --- TLS, shared by every listener and by the connections the broker opens ---
    tls_certificate: str = ""
    tls_private_key: str = ""
    tls_ca_bundle: str = ""
    tls_ciphers: str = BCP195_CIPHERS
    tls_check_hostname: bool = True
    tls_handshake_timeout: float = Field(10, gt=0)

    # --- audit trail (IHE ATNA) ---
    audit_enabled: bool = True
    audit_repository: str = ""
    audit_source_id: str = ""
    audit_enterprise_site_id: str = ""
    audit_retention_days: int = Field(180, ge=1)
    audit_flush_interval: float = Field(0.2, gt=0)
    audit_retry_max: float = Field(30, gt=0)

    # --- retention (broker.retention): what leaves the database when; 0 days = kept for ever ---
    retention_procedure_days: int = Field(30, ge=0)
    retention_timeline: Literal["keep", "export", "delete"] = "export"
    retention_export_dir: str = "var/retention"
    retention_stale_step_grace_hours: float = Field(24, ge=0)
    retention_hl7_days: int = Field(30, ge=0)
    retention_outbox_days: int = Field(7, ge=0)
    retention_channel_report_hours: float = Field(72, ge=0)
    retention_interval: float = Field(3600, gt=0)
    retention_batch_size: int = Field(1000, ge=1)

    log_format: Literal["json", "console"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_patient_data: bool = False

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:
        if not value.strip() or len(value) > 16 or "\\" in value:
            raise ValueError("an AE title has 1 to 16 characters and no backslash")
        return value

    @field_validator("dicom_max_pdu")
    @classmethod
    def _valid_max_pdu(cls, value: int) -> int:
        if value and value < 4096:
            raise ValueError("the maximum PDU is 0 (unlimited) or at least 4096 bytes")
        return value

    @field_validator("dicom_allowed_callers")
    @classmethod
    def _valid_callers(cls, value: str) -> str:
        for entry in _comma_list(value):
            title, separator, host = entry.partition("@")
            if not title or len(title) > 16 or "\\" in title or (separator and not host):
                raise ValueError(f"{entry!r}: each entry is AE or AE@host (AE of 1 to 16 characters)")
        return value

    @field_validator("mwl_hidden_statuses")
    @classmethod
    def _valid_statuses(cls, value: str) -> str:
        known = {"SCHEDULED", "ARRIVED", "READY", "STARTED", "COMPLETED", "CANCELED", "DISCONTINUED"}
        unknown = [s for s in _comma_list(value) if s not in known]
        if unknown:
            raise ValueError(f"unknown SPS status {unknown[0]!r}; known: {', '.join(sorted(known))}")
        return value

    @field_validator("dicom_peers")
    @classmethod
    def _valid_peers(cls, value: str) -> str:
        parse_peers(value)
        return value

    @field_validator("stgcmt_archive_ae")
    @classmethod
    def _archive_is_a_peer(cls, value: str, info: ValidationInfo) -> str:
        if value and value.strip() not in parse_peers(info.data.get("dicom_peers", "")):
            raise ValueError(f"{value!r} is not one of BROKER_DICOM_PEERS")
        return value.strip()

    @field_validator("mpps_forward_aes")
    @classmethod
    def _forward_targets_are_peers(cls, value: str, info: ValidationInfo) -> str:
        peers = parse_peers(info.data.get("dicom_peers", ""))
        unknown = [ae for ae in _comma_list(value) if ae not in peers]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not one of BROKER_DICOM_PEERS")
        return value

    @field_validator("ris_hl7_address")
    @classmethod
    def _valid_ris_address(cls, value: str) -> str:
        if value.strip():
            _host_port(value.strip(), "the RIS address is host:port")
        return value.strip()

    @field_validator("ris_status_transitions")
    @classmethod
    def _valid_ris_transitions(cls, value: str) -> str:
        unknown = [s for s in _comma_list(value) if s not in RIS_ORDER_STATUS]
        if unknown:
            raise ValueError(f"{unknown[0]!r} cannot be reported; one of: {', '.join(RIS_ORDER_STATUS)}")
        return value

    @field_validator("api_tokens")
    @classmethod
    def _valid_api_tokens(cls, value: str) -> str:
        parse_api_tokens(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, value: str) -> str:
        if value.strip():
            try:
                ZoneInfo(value.strip())
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"{value!r} is not an IANA time zone name (e.g. Europe/Berlin)") from None
        return value.strip()

    @field_validator("board_expected_minutes")
    @classmethod
    def _valid_expected_minutes(cls, value: str) -> str:
        parse_expected_minutes(value)
        return value

    @field_validator("dicom_tls_ae_certificates")
    @classmethod
    def _valid_ae_certificates(cls, value: str) -> str:
        parse_ae_certificates(value)
        return value

    @field_validator("audit_repository")
    @classmethod
    def _valid_audit_repository(cls, value: str) -> str:
        if value.strip():
            parse_audit_repository(value.strip())
        return value.strip()

    @field_validator("api_tokens_file")
    @classmethod
    def _tokens_file_exists(cls, value: str) -> str:
        if value and not Path(value).is_file():
            raise ValueError(f"{value!r} is not a readable file")
        return value

    @model_validator(mode="after")
    def _tls_is_complete(self) -> Settings:
        unknown = [ae for ae in _comma_list(self.dicom_tls_peers) if ae not in self.peers]
        if unknown:  # here, not in a field validator: dicom_peers is declared after dicom_tls_peers
            raise ValueError(f"BROKER_DICOM_TLS_PEERS: {unknown[0]!r} is not one of BROKER_DICOM_PEERS")
        listeners = {"BROKER_DICOM_TLS_PORT": self.dicom_tls_port, "BROKER_HL7_TLS_PORT": self.hl7_tls_port,
                     "BROKER_HTTP_TLS_PORT": self.http_tls_port}
        uses_tls = [name for name, port in listeners.items() if port]
        if (self.dicom_tls_peers or self.ris_hl7_tls
                or self.audit_repository.startswith("tls://")) and not self.tls_ca_bundle:
            raise ValueError("connections over TLS need BROKER_TLS_CA_BUNDLE to verify the peer")
        if uses_tls and not (self.tls_certificate and self.tls_private_key):
            raise ValueError(f"{uses_tls[0]} needs BROKER_TLS_CERTIFICATE and BROKER_TLS_PRIVATE_KEY")
        requiring = {"BROKER_DICOM_TLS_REQUIRE_CLIENT_CERT": self.dicom_tls_port and self.dicom_tls_require_client_cert,
                     "BROKER_HL7_TLS_REQUIRE_CLIENT_CERT": self.hl7_tls_port and self.hl7_tls_require_client_cert,
                     "BROKER_HTTP_TLS_REQUIRE_CLIENT_CERT": self.http_tls_port and self.http_tls_require_client_cert}
        needing_ca = [name for name, required in requiring.items() if required]
        if (needing_ca or self.dicom_tls_ae_certificates) and not self.tls_ca_bundle:
            raise ValueError(f"{(needing_ca or ['BROKER_DICOM_TLS_AE_CERTIFICATES'])[0]} needs BROKER_TLS_CA_BUNDLE")
        for name in ("tls_certificate", "tls_private_key", "tls_ca_bundle"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"BROKER_{name.upper()}={path!r} is not a readable file")
        if not self.dicom_port and not self.dicom_tls_port:
            raise ValueError("BROKER_DICOM_PORT and BROKER_DICOM_TLS_PORT are both 0: no DICOM listener")
        return self

    @property
    def ae_certificates(self) -> dict[str, tuple[str, str]]:
        """``dicom_tls_ae_certificates`` as AE title -> (``sha256`` or ``cn``, expected value)."""
        return parse_ae_certificates(self.dicom_tls_ae_certificates)

    @property
    def tls_peers(self) -> frozenset[str]:
        """AE titles of the DICOM peers the broker connects to over TLS."""
        return frozenset(_comma_list(self.dicom_tls_peers))

    @property
    def audit_destination(self) -> tuple[str, str, int] | None:
        """``audit_repository`` as (``tls`` or ``udp``, host, port), or None when records stay local."""
        return parse_audit_repository(self.audit_repository) if self.audit_repository else None

    @property
    def api_token_roles(self) -> dict[str, str]:
        """``api_tokens`` as token -> role (read or write)."""
        return parse_api_tokens(self.api_tokens)

    @property
    def worklist_folder_paths(self) -> list[Path]:
        """``worklist_folders`` as paths (separated by ``os.pathsep``; empty parts ignored)."""
        return [Path(part) for part in self.worklist_folders.split(os.pathsep) if part.strip()]

    @property
    def expected_minutes(self) -> dict[str, float]:
        """``board_expected_minutes`` as modality -> minutes (``*``: every other modality)."""
        return parse_expected_minutes(self.board_expected_minutes)

    @property
    def peers(self) -> dict[str, Peer]:
        """``dicom_peers`` by AE title."""
        return parse_peers(self.dicom_peers)

    @property
    def mpps_forward_targets(self) -> list[str]:
        """AE titles of the peers every MPPS N-CREATE/N-SET is forwarded to."""
        return _comma_list(self.mpps_forward_aes)

    @property
    def ris_address(self) -> tuple[str, int] | None:
        """(host, port) of the RIS's HL7 listener, or None when no status goes to the RIS."""
        return _host_port(self.ris_hl7_address, "the RIS address is host:port") if self.ris_hl7_address else None

    @property
    def ris_transitions(self) -> frozenset[str]:
        """Procedure states whose reaching is reported to the RIS."""
        return frozenset(_comma_list(self.ris_status_transitions))

    @property
    def allowed_callers(self) -> list[tuple[str, str]]:
        """``dicom_allowed_callers`` as (AE title, host or "") pairs; empty = every caller allowed."""
        return [(title, host) for title, _, host in (e.partition("@") for e in _comma_list(self.dicom_allowed_callers))]

    @property
    def hidden_statuses(self) -> frozenset[str]:
        """SPS statuses a worklist query does not return unless it asks for them."""
        return frozenset(_comma_list(self.mwl_hidden_statuses))

    @field_validator("hl7_group_commit", mode="before")
    @classmethod
    def _on_or_off(cls, value: object) -> object:
        # YAML reads an unquoted on/off as a boolean
        return ("on" if value else "off") if isinstance(value, bool) else value

    @field_validator("database_url")
    @classmethod
    def _valid_database_url(cls, value: str) -> str:
        if not value.startswith(("sqlite", "postgresql")):
            raise ValueError("only sqlite:/// and postgresql+psycopg:// URLs are supported")
        return value

    @field_validator("uid_root")
    @classmethod
    def _valid_uid_root(cls, value: str) -> str:
        parts = value.split(".")
        if value and (len(value) > 40 or not all(p.isdigit() and (p == "0" or not p.startswith("0"))
                                                  for p in parts)):
            raise ValueError("a UID root is dotted digits without leading zeros, at most 40 characters")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Order is priority: explicit arguments, then the environment, then the YAML file.
        return (init_settings, env_settings, _YamlSource(settings_cls))


def _host_port(value: str, problem: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: {problem}")
    return host, int(port)


def parse_peers(value: str) -> dict[str, Peer]:
    """``AE@host:port,...`` as a mapping by AE title; a bad entry raises :class:`ValueError` naming it."""
    peers: dict[str, Peer] = {}
    for entry in _comma_list(value):
        title, at, address = entry.partition("@")
        problem = "each peer is AE@host:port (AE of 1 to 16 characters)"
        if not at or not title or len(title) > 16 or "\\" in title:
            raise ValueError(f"{entry!r}: {problem}")
        host, port = _host_port(address, problem)
        if title in peers:
            raise ValueError(f"{entry!r}: AE title {title} is listed twice")
        peers[title] = Peer(title, host, port)
    return peers


API_ROLES = ("read", "write", "audit", "wall")


def parse_api_tokens(value: str) -> dict[str, str]:
    """``token:role,...`` (role read, write, audit or wall) as a mapping token -> role; a bad entry raises
    ValueError.

    The entry is not echoed in the error: it holds a secret.
    """
    tokens: dict[str, str] = {}
    for number, entry in enumerate(_comma_list(value), start=1):
        token, _, role = entry.rpartition(":")
        if not token or role not in API_ROLES:
            raise ValueError(f"entry {number}: each entry is token:role with role read, write, audit or wall")
        if len(token) < 16:
            raise ValueError(f"entry {number}: a token has at least 16 characters")
        tokens[token] = role
    return tokens


def parse_ae_certificates(value: str) -> dict[str, tuple[str, str]]:
    """``AE=sha256:<hex>`` or ``AE=cn:<common name>``, comma separated, as AE -> (kind, value).

    A SHA-256 fingerprint may be written with or without colons, in either case; it is kept as lower
    case hex without colons. A common name is compared exactly.
    """
    bound: dict[str, tuple[str, str]] = {}
    for entry in _comma_list(value):
        title, equals, certificate = entry.partition("=")
        kind, colon, expected = certificate.partition(":")
        problem = "each entry is AE=sha256:<fingerprint> or AE=cn:<common name>"
        title = title.strip()
        if not equals or not colon or not title or len(title) > 16 or kind.lower() not in ("sha256", "cn"):
            raise ValueError(f"{entry!r}: {problem}")
        if kind.lower() == "sha256":
            expected = expected.replace(":", "").strip().lower()
            if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
                raise ValueError(f"{entry!r}: a SHA-256 fingerprint has 64 hex digits")
        elif not expected.strip():
            raise ValueError(f"{entry!r}: {problem}")
        bound[title] = (kind.lower(), expected.strip())
    return bound


def parse_audit_repository(value: str) -> tuple[str, str, int]:
    """``tls://host:port`` (RFC 5425) or ``udp://host:port`` (RFC 5426) as (scheme, host, port)."""
    scheme, separator, address = value.partition("://")
    if not separator or scheme not in ("tls", "udp"):
        raise ValueError(f"{value!r}: the audit repository is tls://host:port or udp://host:port")
    host, port = _host_port(address, "the audit repository is tls://host:port or udp://host:port")
    return scheme, host, port


def parse_expected_minutes(value: str) -> dict[str, float]:
    """``MODALITY=minutes,...`` (``*`` for every other modality) as modality -> minutes; a bad entry
    raises ValueError naming it."""
    expected: dict[str, float] = {}
    for entry in _comma_list(value):
        modality, equals, minutes = entry.partition("=")
        modality = modality.strip().upper()
        try:
            number = float(minutes)
        except ValueError:
            number = -1.0
        if not equals or not modality or number <= 0:
            raise ValueError(f"{entry!r}: each entry is MODALITY=minutes (more than 0), or *=minutes")
        expected[modality] = number
    return expected


def _comma_list(value: str) -> list[str]:
    """A comma-separated setting as its non-empty, stripped entries."""
    return [part.strip() for part in value.split(",") if part.strip()]


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML named by ``BROKER_CONFIG`` (default ``config/broker.yaml`` if present)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ is used instead

    def __call__(self) -> dict[str, Any]:
        return read_config_file()


def read_config_file() -> dict[str, Any]:
    """The settings in the YAML file, or ``{}`` when no file is named and the default is absent."""
    named = os.environ.get("BROKER_CONFIG")
    path = Path(named) if named else DEFAULT_CONFIG_PATH
    if not path.exists():
        if named:
            raise SettingsError(f"BROKER_CONFIG names {path}, which does not exist")
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise SettingsError(f"{path} must hold a mapping of setting: value")
    return data


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, turning any validation failure into a one-line :class:`SettingsError`."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        if not first["loc"]:  # a rule over several settings: the message names them
            raise SettingsError(f"invalid settings: {first['msg'].removeprefix('Value error, ')}") from exc
        name = ".".join(str(p) for p in first["loc"])
        env_name = f"BROKER_{name.upper()}"
        shown = os.environ.get(env_name)
        where = f"{env_name}={shown!r}" if shown is not None else f"setting {name!r}"
        problem = first["msg"]
        if first["type"] == "extra_forbidden":
            problem = "unknown setting"
        raise SettingsError(f"invalid {where}: {problem}") from exc
