"""Loads the mapping files: ``default.yaml`` plus ``senders/*.yaml`` overrides merged over it.

The files are data; this module checks them once at start-up (unknown DICOM keyword, bad field
path, unknown transform or policy) so that a typo stops the broker with a clear line instead of
producing wrong worklist items at 3 a.m.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydicom.datadict import tag_for_keyword

from broker.dicom_json import vr_of

LEVELS = ("patient", "item", "step")
POLICIES = ("take-or-generate", "take-or-reject", "generate")
VALUE_TRANSFORMS = {"date", "ts_date", "ts_time", "sex", "cs", "uid"}
FIELD_TRANSFORMS = {"xpn_to_pn", "xcn_to_pn", "code_sequence", "code_meaning", "patient_id",
                    "issuer_of_patient_id", "other_patient_ids", "location"}
WHEN_KEYS = {"modality", "procedure_code", "sending_application", "sending_facility", "location"}
_PATH = re.compile(r"^(?P<seg>[A-Z][A-Z0-9]{2})-(?P<field>\d+)(?:\.(?P<comp>\d+)(?:\.(?P<sub>\d+))?)?$")


class MappingError(Exception):
    """A mapping file is invalid; the message names the file and the entry."""


@dataclass(frozen=True)
class FieldPath:
    """``SEG-F[.C[.S]]``: where a value sits in an HL7 message."""

    segment: str
    field: int
    component: int = 0
    subcomponent: int = 0

    @classmethod
    def parse(cls, text: str) -> FieldPath:
        match = _PATH.match(text.strip())
        if not match:
            raise ValueError(f"not a field path (SEG-F[.C[.S]]): {text!r}")
        return cls(match["seg"], int(match["field"]), int(match["comp"] or 0), int(match["sub"] or 0))

    def __str__(self) -> str:
        text = f"{self.segment}-{self.field}"
        if self.component:
            text += f".{self.component}"
        if self.subcomponent:
            text += f".{self.subcomponent}"
        return text


@dataclass(frozen=True)
class AttributeRule:
    """DICOM attribute ``keyword`` (at ``level``) from the first ``sources`` path holding a value."""

    keyword: str
    level: str
    sources: tuple[FieldPath, ...]
    transform: str = ""
    table: str = ""
    required: bool = False
    default: str = ""

    @property
    def vr(self) -> str:
        return vr_of(self.keyword)


@dataclass(frozen=True)
class StationRule:
    """Scheduled Station AE Title ``ae_title`` for steps matching every ``when`` condition."""

    when: tuple[tuple[str, str], ...]
    ae_title: str


@dataclass
class Mapping:
    """One effective mapping (the default, or the default with one sender's overrides)."""

    name: str
    default_character_set: str
    study_uid_sources: tuple[FieldPath, ...]
    study_uid_policy: str
    patient_identifier_type: str
    station_sources: tuple[FieldPath, ...]
    station_rules: tuple[StationRule, ...]
    station_default: str
    tables: dict[str, dict[str, str]]
    rules: dict[str, tuple[AttributeRule, ...]]  # by level
    match_application: str = ""
    match_facility: str = ""
    # The rules as the mapping engine runs them, made on first use (broker.mapping.engine.compiled_rules).
    compiled: Any = field(default=None, compare=False, repr=False)


@dataclass
class MappingSet:
    """The default mapping and the sender-specific ones; :meth:`for_sender` picks one."""

    default: Mapping
    senders: list[Mapping] = field(default_factory=list)

    def for_sender(self, application: str, facility: str) -> Mapping:
        """The most specific sender mapping matching MSH-3/MSH-4, else the default."""
        best: Mapping | None = None
        best_score = -1
        for mapping in self.senders:
            if mapping.match_application and mapping.match_application != application:
                continue
            if mapping.match_facility and mapping.match_facility != facility:
                continue
            score = bool(mapping.match_application) + bool(mapping.match_facility)
            if score > best_score:
                best, best_score = mapping, score
        return best or self.default


def load_mappings(directory: Path) -> MappingSet:
    """Read ``directory/default.yaml`` and every ``directory/senders/*.yaml``."""
    default_path = directory / "default.yaml"
    if not default_path.exists():
        raise MappingError(f"{default_path} does not exist (set BROKER_MAPPINGS_DIR)")
    base = _read_yaml(default_path)
    mappings = MappingSet(_build(base, default_path))
    senders_dir = directory / "senders"
    for path in sorted(senders_dir.glob("*.yaml")) if senders_dir.is_dir() else []:
        override = _read_yaml(path)
        match = override.pop("match", None)
        if not isinstance(match, dict) or not (match.get("sending_application")
                                               or match.get("sending_facility")):
            raise MappingError(f"{path}: 'match' needs sending_application and/or sending_facility")
        merged = _deep_merge(copy.deepcopy(base), override)
        merged["name"] = override.get("name", path.stem)
        mapping = _build(merged, path)
        mapping.match_application = str(match.get("sending_application") or "")
        mapping.match_facility = str(match.get("sending_facility") or "")
        mappings.senders.append(mapping)
    return mappings


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise MappingError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise MappingError(f"{path}: must hold a mapping")
    return data


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        elif value is None:
            base.pop(key, None)
        else:
            base[key] = value
    return base


def _paths(value: Any, where: str) -> tuple[FieldPath, ...]:
    items = value if isinstance(value, list) else [value]
    try:
        return tuple(FieldPath.parse(str(v)) for v in items if v)
    except ValueError as exc:
        raise MappingError(f"{where}: {exc}") from exc


def _build(data: dict[str, Any], path: Path) -> Mapping:
    uid = data.get("study_instance_uid") or {}
    policy = uid.get("policy", "take-or-generate")
    if policy not in POLICIES:
        raise MappingError(f"{path}: study_instance_uid.policy must be one of {', '.join(POLICIES)}")
    station = data.get("station_ae_title") or {}
    station_rules = []
    for i, rule in enumerate(station.get("rules") or []):
        when = rule.get("when") or {}
        unknown = set(when) - WHEN_KEYS
        if unknown or not rule.get("ae_title"):
            raise MappingError(f"{path}: station_ae_title.rules[{i}]: needs ae_title and 'when' keys from "
                               f"{', '.join(sorted(WHEN_KEYS))}")
        station_rules.append(StationRule(tuple(sorted((k, str(v)) for k, v in when.items())),
                                         str(rule["ae_title"])[:16]))
    tables = {str(name): {str(k): str(v) for k, v in table.items()}
              for name, table in (data.get("tables") or {}).items()}
    rules: dict[str, tuple[AttributeRule, ...]] = {}
    attributes = data.get("attributes") or {}
    unknown_levels = set(attributes) - set(LEVELS)
    if unknown_levels:
        raise MappingError(f"{path}: unknown attribute level(s) {sorted(unknown_levels)}; use {LEVELS}")
    for level in LEVELS:
        built = []
        for keyword, spec in (attributes.get(level) or {}).items():
            where = f"{path}: attributes.{level}.{keyword}"
            if tag_for_keyword(keyword) is None:
                raise MappingError(f"{where}: not a DICOM keyword")
            if not isinstance(spec, dict) or "source" not in spec:
                raise MappingError(f"{where}: needs a 'source'")
            transform = str(spec.get("transform") or "")
            table = ""
            if transform.startswith("table:"):
                table = transform.split(":", 1)[1]
                if table not in tables:
                    raise MappingError(f"{where}: no table {table!r} under 'tables'")
            elif transform and transform not in VALUE_TRANSFORMS | FIELD_TRANSFORMS:
                raise MappingError(f"{where}: unknown transform {transform!r}")
            built.append(AttributeRule(keyword, level, _paths(spec["source"], where), transform, table,
                                       bool(spec.get("required", False)), str(spec.get("default") or "")))
        rules[level] = tuple(built)
    return Mapping(
        name=str(data.get("name") or path.stem),
        default_character_set=str(data.get("default_character_set") or "8859/1"),
        study_uid_sources=_paths(uid.get("source") or [], f"{path}: study_instance_uid.source"),
        study_uid_policy=policy,
        patient_identifier_type=str(data.get("patient_identifier_type") or ""),
        station_sources=_paths(station.get("source") or [], f"{path}: station_ae_title.source"),
        station_rules=tuple(station_rules),
        station_default=str(station.get("default") or ""),
        tables=tables,
        rules=rules,
    )
