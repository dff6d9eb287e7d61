"""The fast paths of parsing and mapping give what the general ones give.

``Message.value`` splits off only the part it needs, and the mapping engine compiles each mapping's
rules once and remembers per scope which source a rule list chose: these must not change a value.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest

from broker.hl7.message import NULL, Message, Segment, parse
from broker.mapping.charsets import message_charset
from broker.mapping.engine import Mapper, compiled_rules
from broker.mapping.rules import MappingSet

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "hl7"
TRICKY = ("MSH|^~\\&|RIS|HOSP|WL|RAD|20261123||ORM^O01|C1|P|2.3.1\r"
          "PID|1||ID1^^^HOSP^MR~ID2^^^SSA^SS~||DOE^JANE~\"\"|~X|\"\"|F^^&x&y\r"
          "OBR|1|P1||^^^CODE^Text \\T\\ more\\S\\x^LOCAL|||~~||\"\"^b|||A\\F\\B\\E\\C\\X41\\|^&&\r")


def reference_value(message: Message, segment: Segment | None, number: int, component: int = 1,
                    subcomponent: int = 0, repetition: int = 1) -> str:
    """Message.value as it was written before its fast path: every repetition and component split
    (for 1-based component and repetition numbers, the only ones callers use)."""
    reps = message.repetitions(segment, number)
    if len(reps) < repetition:
        return ""
    rep = reps[repetition - 1]
    if rep == NULL:
        return NULL
    parts = rep.split(message.delimiters.component)
    if len(parts) < component:
        return ""
    text = parts[component - 1]
    if subcomponent:
        subs = text.split(message.delimiters.subcomponent)
        text = subs[subcomponent - 1] if len(subs) >= subcomponent else ""
    return text if text == NULL else message.unescape(text)


def messages() -> list[Message]:
    texts = [TRICKY] + [p.read_bytes().decode("latin-1") for p in sorted(SAMPLES.glob("*.hl7"))]
    return [parse(t) for t in texts]


@pytest.mark.parametrize("message", messages())
def test_value_matches_the_general_split(message: Message) -> None:
    for segment in message.segments:
        for number, component, subcomponent, repetition in itertools.product(
                range(len(segment.fields) + 1), range(1, 7), range(0, 3), range(1, 4)):
            assert message.value(segment, number, component, subcomponent, repetition) == reference_value(
                message, segment, number, component, subcomponent, repetition), (segment.name, number, component)


def map_sample(mappings: MappingSet, name: str) -> tuple[object, object, list[object]]:
    message = parse((SAMPLES / name).read_bytes().decode("latin-1"))
    mapping = mappings.for_sender(*message.sender)
    mapper = Mapper(message, mapping, message_charset(message.value(message.msh, 18), "8859/1"))
    return mapper.map_patient(), mapper.map_orders(), list(mapper.problems)


def test_rules_compile_once_and_follow_a_changed_mapping(mappings: MappingSet) -> None:
    mapping = dataclasses.replace(mappings.default)
    assert compiled_rules(mapping) is compiled_rules(mapping)  # kept on the mapping
    _, orders, problems = map_sample(MappingSet(mapping), "orm_o01_new.hl7")
    assert orders and not problems
    # A mapping whose rules are replaced after use is compiled again (tests and previews do this).
    mapping.rules = {**mapping.rules, "item": tuple(r for r in mapping.rules["item"]
                                                   if r.keyword != "AccessionNumber")}
    _, changed, _ = map_sample(MappingSet(mapping), "orm_o01_new.hl7")
    assert "00080050" in orders[0].procedures[0].steps[0].item  # type: ignore[attr-defined]
    assert "00080050" not in changed[0].procedures[0].steps[0].item  # type: ignore[index]


def test_evaluate_of_a_single_rule_matches_the_compiled_run(mappings: MappingSet) -> None:
    message = parse((SAMPLES / "orm_o01_new.hl7").read_bytes().decode("latin-1"))
    mapper = Mapper(message, mappings.default, message_charset("8859/1", "8859/1"))
    scope = mapper.message_scope()
    for rule in mappings.default.rules["patient"]:
        fresh = Mapper(message, mappings.default, message_charset("8859/1", "8859/1"))
        assert mapper.evaluate(rule, scope) == fresh.evaluate(rule, fresh.message_scope())


def test_rules_reading_the_same_fields_share_one_source_tuple(mappings: MappingSet) -> None:
    by_level = compiled_rules(dataclasses.replace(mappings.default))
    rules = [rule for level in by_level.values() for rule in level]
    for a, b in itertools.combinations(rules, 2):
        assert a.sources == a.rule.sources
        assert (a.sources is b.sources) == (a.rule.sources == b.rule.sources), (a.keyword, b.keyword)


@pytest.mark.parametrize("name", sorted(p.name for p in SAMPLES.glob("*.hl7")))
def test_each_rule_alone_gives_what_the_compiled_step_gives(mappings: MappingSet, name: str) -> None:
    """The per-scope choice of a shared source list and the per-message split of a field give the
    values a fresh mapper finds for each rule on its own."""
    message = parse((SAMPLES / name).read_bytes().decode("latin-1"))
    mapping = mappings.for_sender(*message.sender)
    charset = message_charset(message.value(message.msh, 18), "8859/1")
    mapper = Mapper(message, mapping, charset)
    scope = mapper.message_scope()
    for level in ("patient", "item", "step"):
        for rule in mapping.rules[level]:
            fresh = Mapper(message, mapping, charset)
            assert mapper.evaluate(rule, scope) == fresh.evaluate(rule, fresh.message_scope()), rule.keyword
