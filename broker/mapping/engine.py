"""Applies a :class:`~broker.mapping.rules.Mapping` to a parsed HL7 message.

The message is cut into scopes: message-level segments (MSH, PID, PV1, ...), one group per ORC, one
detail per OBR inside it, and one step per IPC (or one step per OBR when there is no IPC). A field
path is looked up in the innermost scope first, so ``OBR-18`` means "this order's OBR" and ``PID-5``
the message's patient. Every problem is collected, so an ERR segment names each bad field at once.

Mapping runs for every message, about 30 rules of which several read the same field (PID-3 for three
attributes, OBR-4 for four, the timestamp for date and time): each rule's tag, VR and transform are
looked up once per mapping (:func:`compiled_rules`), where rules with equal source lists get one
shared tuple; within one message a source list's choice is worked out once per scope, the patient
identifier's repetitions once per field, and a field's components once (OBR-4 feeds four attributes).
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom.uid import generate_uid

from broker.dicom_json import JsonDataset, element, element_value, tag_of, vr_element, vr_of
from broker.domain.records import (
    OrderRecord,
    PatientKey,
    PatientRecord,
    ProcedureRecord,
    StepRecord,
)
from broker.hl7.errors import DATA_TYPE_ERROR, REQUIRED_FIELD_MISSING, MessageError, Problem
from broker.hl7.message import NULL, Message, Segment
from broker.mapping import transforms
from broker.mapping.charsets import Charset
from broker.mapping.rules import AttributeRule, FieldPath, Mapping

MESSAGE_LEVEL_END = "ORC"
# The attributes every step gets besides the mapping's rules.
_SPECIFIC_CHARACTER_SET = tag_of("SpecificCharacterSet")
_SCHEDULED_STATION_AE_TITLE = tag_of("ScheduledStationAETitle")
_STUDY_INSTANCE_UID = tag_of("StudyInstanceUID")
_SCHEDULED_PROCEDURE_STEP_SEQUENCE = tag_of("ScheduledProcedureStepSequence")
_CODE_VALUE = tag_of("CodeValue")


@dataclass
class Located:
    """A segment with its occurrence number in the message (for ERR segment sequence)."""

    segment: Segment
    sequence: int


@dataclass
class Scope:
    """Segments visible from one step: innermost layer first.

    ``found`` remembers, per source list, which source :meth:`Mapper._first_source` chose, keyed by
    the list's id (the mapping holds the list as long as the scope lives; the entry keeps it too).
    """

    layers: list[dict[str, Located]]
    found: dict[int, tuple[tuple[FieldPath, ...], tuple[FieldPath, Located] | None]] = field(
        default_factory=dict, compare=False, repr=False)
    # every visible segment name -> its innermost occurrence: one lookup per source instead of one per layer
    visible: dict[str, Located] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.visible = {}
        for layer in reversed(self.layers):
            self.visible.update(layer)

    def find(self, name: str) -> Located | None:
        return self.visible.get(name)


@dataclass
class MappedMessage:
    """What one message means: its patient and, for order messages, its orders."""

    patient: PatientRecord | None
    orders: list[OrderRecord] = field(default_factory=list)


class Mapper:
    """Maps one message with one mapping; create one per message (it collects problems)."""

    def __init__(self, message: Message, mapping: Mapping, charset: Charset, uid_root: str = "") -> None:
        self.message = message
        self.mapping = mapping
        self.charset = charset
        self.uid_root = uid_root
        self.problems: list[Problem] = []
        self._rules = compiled_rules(mapping)
        # primary_cx per (segment, field), keyed by the segment's id; the entry keeps the segment
        self._cx: dict[tuple[int, int], tuple[Segment, tuple[list[str], list[list[str]]]]] = {}
        # _components per (segment, field, repetition), keyed by the segment's id likewise
        self._split: dict[tuple[int, int, int], tuple[Segment, list[str] | None]] = {}
        self._message_scope, self._groups = self._cut_scopes()

    # --- scopes ----------------------------------------------------------------------------------
    def _cut_scopes(self) -> tuple[dict[str, Located], list[tuple[dict[str, Located], list[Any]]]]:
        """Message-level segments, then per ORC: group segments and details (OBR -> steps)."""
        counts: dict[str, int] = {}
        message_level: dict[str, Located] = {}
        groups: list[tuple[dict[str, Located], list[Any]]] = []
        for segment in self.message.segments:
            counts[segment.name] = counts.get(segment.name, 0) + 1
            located = Located(segment, counts[segment.name])
            if segment.name == "ORC":
                groups.append(({"ORC": located}, []))
            elif not groups:
                message_level.setdefault(segment.name, located)
            elif segment.name == "OBR":
                groups[-1][1].append(({"OBR": located}, []))
            elif segment.name == "IPC" and groups[-1][1]:
                groups[-1][1][-1][1].append({"IPC": located})
            elif groups[-1][1]:
                groups[-1][1][-1][0].setdefault(segment.name, located)
            else:
                groups[-1][0].setdefault(segment.name, located)
        return message_level, groups

    def message_scope(self) -> Scope:
        return Scope([self._message_scope])

    # --- values ----------------------------------------------------------------------------------
    def _raw_value(self, located: Located, path: FieldPath) -> str:
        """The value at ``path``, unescaped. A path without a subcomponent reads the whole component:
        the components such rules read are text without subcomponents, so an unescaped ``&`` in them
        ("CT CHEST & ABDOMEN") is kept as the sender wrote it instead of cutting the value there."""
        return self.message.value(located.segment, path.field, path.component or 1, path.subcomponent)

    def _first_source(self, scope: Scope, paths: tuple[FieldPath, ...]) -> tuple[FieldPath, Located] | None:
        """The first path whose segment is in scope and whose field has a value (or is NULL)."""
        key = id(paths)
        known = scope.found.get(key)
        if known is not None and known[0] is paths:
            return known[1]
        found = None
        visible = scope.visible
        component = self.message.delimiters.component
        for path in paths:
            located = visible.get(path.segment)
            if located is None:
                continue
            if path.component:
                present = self.message.value(located.segment, path.field, path.component)
            else:  # Segment.raw, inline: this runs for most sources of every rule
                fields = located.segment.fields
                present = fields[path.field].strip(component) if path.field < len(fields) else ""
            if present:
                found = path, located
                break
        scope.found[key] = (paths, found)
        return found

    def _blame(self, scope: Scope, paths: tuple[FieldPath, ...]) -> FieldPath:
        """The path to name when no source has a value: one whose segment is in scope, else one whose
        segment the message has, else the last (the most basic) source."""
        names = {s.name for s in self.message.segments}
        return (next((p for p in paths if scope.find(p.segment)), None)
                or next((p for p in paths if p.segment in names), None) or paths[-1])

    def _problem(self, code: str, text: str, path: FieldPath | None, located: Located | None) -> None:
        if path is None:
            self.problems.append(Problem(code, text))
            return
        self.problems.append(Problem(code, text, path.segment, located.sequence if located else 1,
                                     path.field, path.component))

    def evaluate(self, rule: AttributeRule, scope: Scope) -> tuple[bool, Any]:
        """(present, value) for a rule: not present = the message does not speak of it; value None = clear."""
        return self._evaluate(_compile_rule(rule, self.mapping.tables), scope)

    def _evaluate(self, compiled: CompiledRule, scope: Scope) -> tuple[bool, Any]:
        rule = compiled.rule
        found = self._first_source(scope, compiled.sources)
        if found is None:
            if rule.default:
                return True, rule.default
            if rule.required:
                path = self._blame(scope, rule.sources)
                self._problem(REQUIRED_FIELD_MISSING, f"{rule.keyword} is required ({path})", path,
                              scope.find(path.segment))
            return False, None
        path, located = found
        try:
            value = self._transform(compiled, path, located)
        except transforms.TransformError as exc:
            self._problem(DATA_TYPE_ERROR, f"{rule.keyword}: {exc.reason}", path, located)
            return False, None
        if value is None and rule.required:
            self._problem(REQUIRED_FIELD_MISSING, f"{rule.keyword} is required ({path})", path, located)
        return True, value

    def _transform(self, compiled: CompiledRule, path: FieldPath, located: Located) -> Any:
        if compiled.field_transform is not None:
            return compiled.field_transform(self, path, located)
        raw = self._raw_value(located, path)
        if raw == NULL:
            return None
        if compiled.table is not None:
            return transforms.map_value(raw, compiled.table)
        value = compiled.value_transform(raw) if compiled.value_transform is not None else raw
        return transforms.truncate(value, compiled.vr) if isinstance(value, str) else value

    def _components(self, path: FieldPath, located: Located, repetition: int = 1) -> list[str] | None:
        """The unescaped components of a field's repetition (None: NULL), split once per message: the
        procedure code field feeds four attributes. Callers read the list and never change it."""
        segment = located.segment
        key = (id(segment), path.field, repetition)
        known = self._split.get(key)
        if known is not None and known[0] is segment:
            return known[1]
        reps = self.message.repetitions(segment, path.field)
        if len(reps) < repetition:
            comps: list[str] | None = []
        else:
            comps = self.message.components(reps[repetition - 1])
            if comps == [NULL]:
                comps = None
        self._split[key] = (segment, comps)
        return comps

    def _subcomponents(self, path: FieldPath, located: Located, component: int) -> list[str]:
        """The unescaped subcomponents of one component of the field's first repetition, split at the
        real separator (an escaped ``\\T\\`` stays a literal ``&``): a name's FN, a PL's HD."""
        reps = self.message.repetitions(located.segment, path.field)
        comps = reps[0].split(self.message.delimiters.component) if reps else []
        return self.message.subcomponents(comps[component - 1]) if len(comps) >= component else []

    # --- patient identity ------------------------------------------------------------------------
    def _cx_repetitions(self, located: Located, number: int) -> list[list[str]]:
        """The components of each CX repetition; CX.4 (an HD) reduced to its namespace ID, its first
        subcomponent cut at the real separator (an escaped ``&`` in it is kept)."""
        d = self.message.delimiters
        out = []
        for r in self.message.repetitions(located.segment, number):
            if not r or r == NULL:
                continue
            comps = self.message.components(r)
            if len(comps) > 3 and (d.subcomponent in comps[3] or d.escape in r):
                comps[3] = self.message.subcomponents(r.split(d.component)[3])[0]
            out.append(comps)
        return out

    def primary_cx(self, located: Located, number: int) -> tuple[list[str], list[list[str]]]:
        """The CX repetition that is the Patient ID, and the others (worked out once per field: the
        patient key and three patient attributes read it)."""
        segment = located.segment
        known = self._cx.get((id(segment), number))
        if known is not None and known[0] is segment:
            return known[1]
        primary = self._primary_cx(located, number)
        self._cx[(id(segment), number)] = (segment, primary)
        return primary

    def _primary_cx(self, located: Located, number: int) -> tuple[list[str], list[list[str]]]:
        reps = self._cx_repetitions(located, number)
        if not reps:
            return [], []
        wanted = self.mapping.patient_identifier_type
        index = 0
        if wanted:
            index = next((i for i, r in enumerate(reps) if len(r) > 4 and r[4] == wanted), 0)
        return reps[index], reps[:index] + reps[index + 1:]

    def patient_key(self, segment_name: str = "PID", number: int = 3) -> PatientKey | None:
        located = self._message_scope.get(segment_name)
        if located is None:
            return None
        primary, _ = self.primary_cx(located, number)
        if not primary or not primary[0]:
            return None
        return PatientKey(transforms.truncate(primary[0], "LO"), _cx_issuer(primary))

    # --- results ---------------------------------------------------------------------------------
    def map_patient(self) -> PatientRecord | None:
        scope = self.message_scope()
        attributes: JsonDataset = {}
        for rule in self._rules.get("patient", ()):
            present, value = self._evaluate(rule, scope)
            if present:
                attributes[rule.tag] = vr_element(rule.vr, value)
        key = self.patient_key()
        if key is None:
            return None
        return PatientRecord(key, attributes)

    def map_orders(self) -> list[OrderRecord]:
        orders: list[OrderRecord] = []
        by_placer: dict[tuple[str, str, str, str], OrderRecord] = {}
        for group_segments, details in self._groups:
            orc = group_segments["ORC"]
            order_key = (self.message.value(orc.segment, 2, 1), self.message.value(orc.segment, 2, 2),
                         self.message.value(orc.segment, 3, 1), self.message.value(orc.segment, 3, 2))
            order = by_placer.get(order_key)
            if order is None:
                order = OrderRecord(*order_key, order_control=self.message.value(orc.segment, 1),
                                    order_status=self.message.value(orc.segment, 5))
                by_placer[order_key] = order
                orders.append(order)
            for detail_segments, ipcs in details or [({}, [])]:
                for ipc in ipcs or [{}]:
                    scope = Scope([ipc, detail_segments, group_segments, self._message_scope])
                    self._add_step(order, scope)
        return orders

    def _add_step(self, order: OrderRecord, scope: Scope) -> None:
        item: JsonDataset = {_SPECIFIC_CHARACTER_SET: element("SpecificCharacterSet", self.charset.dicom_term)}
        values: dict[str, Any] = {}
        for rule in self._rules.get("item", ()):
            present, value = self._evaluate(rule, scope)
            if present and value not in (None, "", []):
                item[rule.tag] = vr_element(rule.vr, value)
                values[rule.keyword] = value
        step: JsonDataset = {}
        for rule in self._rules.get("step", ()):
            present, value = self._evaluate(rule, scope)
            if present and value not in (None, "", []):
                step[rule.tag] = vr_element(rule.vr, value)
                values[rule.keyword] = value
        station = self._station_ae_title(scope, values)
        if station:
            step[_SCHEDULED_STATION_AE_TITLE] = element("ScheduledStationAETitle", station)
        study_uid = self._study_uid(scope, order, values)
        item[_STUDY_INSTANCE_UID] = element("StudyInstanceUID", study_uid)
        item[_SCHEDULED_PROCEDURE_STEP_SEQUENCE] = element("ScheduledProcedureStepSequence", [step])
        rp_id = str(values.get("RequestedProcedureID", ""))
        accession = str(values.get("AccessionNumber", ""))
        procedure = next((p for p in order.procedures if p.study_instance_uid == study_uid
                          and p.requested_procedure_id == rp_id), None)
        if procedure is None:
            procedure = ProcedureRecord(rp_id, accession, study_uid,
                                        str(values.get("RequestedProcedureDescription", "")))
            order.procedures.append(procedure)
        procedure.steps.append(StepRecord(str(values.get("ScheduledProcedureStepID", "")), item))

    def _station_ae_title(self, scope: Scope, values: dict[str, Any]) -> str:
        found = self._first_source(scope, self.mapping.station_sources)
        if found is not None:
            value = self._raw_value(found[1], found[0])
            if value and value != NULL:
                return transforms.truncate(value, "AE")
        if not self.mapping.station_rules:
            return self.mapping.station_default
        sending_application, sending_facility = self.message.sender
        facts = {
            "modality": str(values.get("Modality", "")),
            "procedure_code": _first_code(values.get("ScheduledProtocolCodeSequence"))
            or _first_code(values.get("RequestedProcedureCodeSequence")),
            "sending_application": sending_application,
            "sending_facility": sending_facility,
            "location": str(values.get("ScheduledProcedureStepLocation", "")),
        }
        for rule in self.mapping.station_rules:
            if all(facts.get(key) == expected for key, expected in rule.when):
                return rule.ae_title
        return self.mapping.station_default

    def _study_uid(self, scope: Scope, order: OrderRecord, values: dict[str, Any]) -> str:
        policy = self.mapping.study_uid_policy
        if policy != "generate":
            found = self._first_source(scope, self.mapping.study_uid_sources)
            if found is not None:
                path, located = found
                uid = self._raw_value(located, path)
                if uid != NULL and transforms.is_valid_uid(uid):
                    return uid
                if uid != NULL:
                    self._problem(DATA_TYPE_ERROR, f"StudyInstanceUID: not a valid UID: {uid[:70]!r}",
                                  path, located)
                    return ""
            if policy == "take-or-reject":
                sources = self.mapping.study_uid_sources
                blamed = self._blame(scope, sources) if sources else None
                self._problem(REQUIRED_FIELD_MISSING, "StudyInstanceUID is required by the mapping policy",
                              blamed, scope.find(blamed.segment) if blamed else None)
                return ""
        entropy = ["|".join(self.message.sender), order.placer_order_number, order.placer_issuer,
                   str(values.get("AccessionNumber", "")), str(values.get("RequestedProcedureID", ""))]
        return stable_uid(entropy, self.uid_root)

    def raise_problems(self) -> None:
        """Raise the collected problems, one per location and code (date and time share a field)."""
        unique = list({(p.location, p.code): p for p in self.problems}.values())
        if unique:
            raise MessageError(unique)


def stable_uid(entropy: list[str], root: str = "") -> str:
    """A UID that is the same for the same inputs: a repeated or changed order keeps its study.

    Under ``root`` it is pydicom's hash-based UID; without a root it is a 2.25 UID from a name-based
    UUID (PS3.5 B.2). pydicom's ``generate_uid(prefix=None)`` ignores its entropy sources, so the
    2.25 form is made here.
    """
    if root:
        return str(generate_uid(prefix=f"{root}.", entropy_srcs=entropy))
    digest = hashlib.sha256("\x00".join(entropy).encode("utf-8")).digest()[:16]
    return f"2.25.{uuid.UUID(bytes=digest, version=5).int}"


def _cx_issuer(components: list[str]) -> str:
    """CX.4's namespace ID (:meth:`Mapper._cx_repetitions` took it out of the HD already)."""
    issuer = components[3] if len(components) > 3 else ""
    return transforms.truncate(issuer, "LO")


def _first_code(sequence: Any) -> str:
    if not sequence:
        return ""
    return str(element_value(sequence[0].get(_CODE_VALUE)))


# --- transforms that need the whole field ----------------------------------------------------------
def _xpn(mapper: Mapper, path: FieldPath, located: Located) -> str | None:
    comps = mapper._components(path, located)
    if comps is None:
        return None
    return transforms.xpn_to_pn(comps, mapper._subcomponents(path, located, 1)) or None


def _xcn(mapper: Mapper, path: FieldPath, located: Located) -> str | None:
    comps = mapper._components(path, located)
    if comps is None:
        return None
    return transforms.xcn_to_pn(comps, mapper._subcomponents(path, located, 2)) or None


def _code_sequence(mapper: Mapper, path: FieldPath, located: Located) -> list[JsonDataset] | None:
    comps = mapper._components(path, located)
    if comps is None:
        return None
    code, meaning, scheme = transforms.pick_code_triple(comps)
    item = transforms.code_item(code, meaning, scheme)
    if item is None:
        return []
    return [{tag_of(k): element(k, v) for k, v in item.items()}]


def _code_meaning(mapper: Mapper, path: FieldPath, located: Located) -> str | None:
    comps = mapper._components(path, located)
    if comps is None:
        return None
    code, meaning, _ = transforms.pick_code_triple(comps)
    return transforms.truncate(meaning or code, "LO")


def _patient_id(mapper: Mapper, path: FieldPath, located: Located) -> str | None:
    primary, _ = mapper.primary_cx(located, path.field)
    return transforms.truncate(primary[0], "LO") if primary and primary[0] else None


def _issuer(mapper: Mapper, path: FieldPath, located: Located) -> str | None:
    primary, _ = mapper.primary_cx(located, path.field)
    return _cx_issuer(primary) or None


def _other_ids(mapper: Mapper, path: FieldPath, located: Located) -> list[JsonDataset] | None:
    _, others = mapper.primary_cx(located, path.field)
    items = []
    for cx in others:
        if cx and cx[0]:
            item = {tag_of("PatientID"): element("PatientID", transforms.truncate(cx[0], "LO")),
                    tag_of("TypeOfPatientID"): element("TypeOfPatientID", "TEXT")}
            issuer = _cx_issuer(cx)
            if issuer:
                item[tag_of("IssuerOfPatientID")] = element("IssuerOfPatientID", issuer)
            items.append(item)
    return items or None


def _location(mapper: Mapper, path: FieldPath, located: Located) -> str | None:
    comps = mapper._components(path, located)
    if comps is None:
        return None
    firsts = (mapper._subcomponents(path, located, n)[:1] for n in (1, 2, 3))
    parts = [first[0] for first in firsts if first and first[0]]
    return transforms.truncate(" ".join(parts), "LO")


_FIELD_TRANSFORMS: dict[str, Callable[[Mapper, FieldPath, Located], Any]] = {
    "xpn_to_pn": _xpn,
    "xcn_to_pn": _xcn,
    "code_sequence": _code_sequence,
    "code_meaning": _code_meaning,
    "patient_id": _patient_id,
    "issuer_of_patient_id": _issuer,
    "other_patient_ids": _other_ids,
    "location": _location,
}


def _uid(value: str) -> str:
    if not transforms.is_valid_uid(value):
        raise transforms.TransformError(f"not a valid UID: {value[:70]!r}")
    return value


# Date and time of one step come from the same timestamp, one rule after the other: the second
# parse is a cache hit. (A bad timestamp raises, which the cache does not keep.)
_ts_to_da_tm = functools.lru_cache(maxsize=32)(transforms.hl7_ts_to_da_tm)

_VALUE_TRANSFORMS: dict[str, Callable[[str], str]] = {
    "date": transforms.hl7_date_to_da,
    "ts_date": lambda v: _ts_to_da_tm(v)[0],
    "ts_time": lambda v: _ts_to_da_tm(v)[1],
    "sex": transforms.sex_to_dicom,
    "cs": transforms.clean_cs,
    "uid": _uid,
}


# --- rules compiled once per mapping ----------------------------------------------------------------
@dataclass(frozen=True)
class CompiledRule:
    """An attribute rule with its tag, VR, transform function and table looked up."""

    rule: AttributeRule
    keyword: str
    tag: str
    vr: str
    # rule.sources, or an equal tuple of an earlier rule: rules reading the same fields share one tuple,
    # so a scope works out their source once (OBR-4 for four attributes, the timestamp for two)
    sources: tuple[FieldPath, ...]
    field_transform: Callable[[Mapper, FieldPath, Located], Any] | None
    value_transform: Callable[[str], Any] | None
    table: dict[str, str] | None


def _unknown_transform(name: str) -> Callable[[str], Any]:
    def fail(_raw: str) -> Any:
        raise KeyError(name)  # as the lookup in _VALUE_TRANSFORMS did before rules were compiled
    return fail


def _compile_rule(rule: AttributeRule, tables: dict[str, dict[str, str]],
                  shared_sources: dict[tuple[FieldPath, ...], tuple[FieldPath, ...]] | None = None) -> CompiledRule:
    name = rule.transform
    field_transform = _FIELD_TRANSFORMS.get(name)
    value_transform = None
    if field_transform is None and not rule.table and name:
        value_transform = _VALUE_TRANSFORMS.get(name) or _unknown_transform(name)
    table = tables[rule.table] if field_transform is None and rule.table else None
    sources = rule.sources if shared_sources is None else shared_sources.setdefault(rule.sources, rule.sources)
    return CompiledRule(rule, rule.keyword, tag_of(rule.keyword), vr_of(rule.keyword), sources, field_transform,
                        value_transform, table)


@dataclass(frozen=True)
class _CompiledMapping:
    """The compiled rules of one mapping, with the rules and tables they were made from (to notice a
    mapping changed after compiling, as tests do)."""

    rules: dict[str, tuple[AttributeRule, ...]]
    tables: dict[str, dict[str, str]]
    by_level: dict[str, tuple[CompiledRule, ...]]


def compiled_rules(mapping: Mapping) -> dict[str, tuple[CompiledRule, ...]]:
    """The mapping's rules by level, compiled on first use and kept on the mapping."""
    compiled = mapping.compiled
    if isinstance(compiled, _CompiledMapping) and compiled.rules is mapping.rules \
            and compiled.tables is mapping.tables:
        return compiled.by_level
    # Two threads may both compile a new mapping; they make the same result, and either one is kept.
    shared_sources: dict[tuple[FieldPath, ...], tuple[FieldPath, ...]] = {}
    by_level = {level: tuple(_compile_rule(rule, mapping.tables, shared_sources) for rule in rules)
                for level, rules in mapping.rules.items()}
    mapping.compiled = _CompiledMapping(mapping.rules, mapping.tables, by_level)
    return by_level
