"""``broker mapping test FILE.hl7``: what a message would produce, without storing anything.

The integrator's go-live tool: it runs the same decoding and mapping as the listener and prints each
worklist item as a DICOM dump (or DICOM JSON), or the ERR problems the sender would get back.
"""

from __future__ import annotations

import json

from pydicom import Dataset

from broker.config import Settings
from broker.dicom_json import JsonDataset
from broker.domain import worklist_item
from broker.domain.states import StepStatus
from broker.hl7.ack import Header
from broker.hl7.errors import MessageError
from broker.hl7.message import control_problems, may_hold_control_characters, parse
from broker.intake.dispatch import ORDER_CONTROL, order_action
from broker.mapping.charsets import message_charset
from broker.mapping.engine import Mapper
from broker.mapping.rules import load_mappings


def preview(raw: bytes, settings: Settings, *, as_json: bool = False) -> str:
    """A printable report of the items ``raw`` maps to (or the problems it has)."""
    mappings = load_mappings(settings.mappings_dir)
    header = Header.from_raw(raw)
    mapping = mappings.for_sender(header.sending_application, header.sending_facility)
    lines = [f"mapping: {mapping.name}"]
    try:
        charset = message_charset(header.character_set, mapping.default_character_set)
        text = raw.decode(charset.python_codec)
        message = parse(text, charset.python_codec)
        if may_hold_control_characters(raw, text, message.delimiters.escape):  # as the intake refuses them
            control = control_problems(message)
            if control:
                raise MessageError(control, reject=any(p.segment == "MSH" for p in control))
        lines.append(f"message: {'^'.join(message.message_type)} {message.control_id} "
                     f"(character set {charset.hl7_name} -> Specific Character Set {charset.dicom_term!r})")
        mapper = Mapper(message, mapping, charset, settings.uid_root)
        patient = mapper.map_patient()
        orders = mapper.map_orders()
        mapper.raise_problems()
    except (MessageError, ValueError) as exc:
        problems = exc.problems if isinstance(exc, MessageError) else []
        lines.append("the message would be refused:")
        lines.extend(f"  ERR {p.code} {p.location or 'message'}: {p.text}" for p in problems)
        if not problems:
            lines.append(f"  {exc}")
        return "\n".join(lines)
    patient_attributes: JsonDataset = patient.attributes if patient else {}
    items: list[JsonDataset] = []
    for order in orders:
        known = (order.order_control, order.order_status) in ORDER_CONTROL or \
            (order.order_control, "*") in ORDER_CONTROL
        action = order_action(order.order_control, order.order_status) if known else "unsupported"
        lines.append(f"order {order.placer_order_number or order.filler_order_number}: ORC-1 "
                     f"{order.order_control or '(none)'} ORC-5 {order.order_status or '(none)'} -> {action}")
        for procedure in order.procedures:
            for step in procedure.steps:
                items.append(worklist_item.build_item(step.item, patient_attributes, StepStatus.SCHEDULED))
    if as_json:
        return "\n".join(lines) + "\n" + json.dumps(items, indent=2, ensure_ascii=False)
    for number, item in enumerate(items, start=1):
        lines.append(f"--- worklist item {number} ---")
        lines.append(str(Dataset.from_json(item)))
    return "\n".join(lines)
