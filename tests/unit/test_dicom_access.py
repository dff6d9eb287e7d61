"""The calling-AE allow-list: who may associate, by AE title and, optionally, by address."""

from __future__ import annotations

from broker.config import load_settings
from broker.dicom.access import CallerPolicy


def policy(setting: str) -> CallerPolicy:
    return CallerPolicy.from_pairs(load_settings(dicom_allowed_callers=setting).allowed_callers)


def test_empty_list_lets_every_caller_in() -> None:
    assert policy("").allows("ANYONE", "10.1.2.3")


def test_listed_title_from_anywhere() -> None:
    rules = policy("CT01, MR1")
    assert rules.allows("CT01", "10.1.2.3")
    assert rules.allows("MR1", "192.168.0.9")
    assert not rules.allows("US3", "10.1.2.3")


def test_titles_are_case_sensitive_as_ae_titles_are() -> None:
    assert not policy("CT01").allows("ct01", "10.1.2.3")


def test_title_bound_to_an_address_only_from_there() -> None:
    rules = policy("CT01@10.0.0.5,MR1")
    assert rules.allows("CT01", "10.0.0.5")
    assert not rules.allows("CT01", "10.0.0.6")
    assert rules.allows("MR1", "10.0.0.6")


def test_host_names_are_resolved() -> None:
    rules = policy("CT01@localhost")
    assert rules.allows("CT01", "127.0.0.1")
    assert not rules.allows("CT01", "10.9.9.9")


def test_a_title_listed_with_and_without_address_is_allowed_anywhere() -> None:
    assert policy("CT01@10.0.0.5,CT01").allows("CT01", "10.0.0.77")
