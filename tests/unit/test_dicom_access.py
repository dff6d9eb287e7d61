"""The calling-AE allow-list: who may associate, by AE title and, optionally, by address; and AE titles
bound to a client certificate (by fingerprint or common name), which need TLS and that certificate."""

from __future__ import annotations

from broker.config import load_settings
from broker.dicom.access import PLAIN, CallerPolicy, Channel
from broker.tls import PeerCertificate


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


# --- AE titles bound to a certificate ----------------------------------------------------------------
CT01_CERT = PeerCertificate("ab" * 32, "ct01.example.test", "O=Broker tests,CN=ct01.example.test")
MR01_CERT = PeerCertificate("cd" * 32, "mr01.example.test", "O=Broker tests,CN=mr01.example.test")


def bound(allowed: str = "") -> CallerPolicy:
    settings = load_settings(dicom_allowed_callers=allowed, tls_ca_bundle=__file__,
                             dicom_tls_ae_certificates=f"CT01=sha256:{'AB' * 32},MR01=cn:mr01.example.test")
    return CallerPolicy.from_pairs(settings.allowed_callers, settings.ae_certificates)


def test_a_bound_title_is_admitted_over_tls_with_its_certificate() -> None:
    rules = bound()
    assert rules.refusal("CT01", "10.1.2.3", Channel(True, CT01_CERT)) is None  # by fingerprint
    assert rules.refusal("MR01", "10.1.2.3", Channel(True, MR01_CERT)) is None  # by common name


def test_a_bound_title_with_another_certificate_is_refused() -> None:
    rules, other = bound(), "calling AE title bound to another certificate"
    assert rules.refusal("CT01", "10.1.2.3", Channel(True, MR01_CERT)) == other
    assert rules.refusal("MR01", "10.1.2.3", Channel(True, CT01_CERT)) == other


def test_a_bound_title_without_tls_or_certificate_is_refused() -> None:
    rules = bound()
    assert rules.refusal("CT01", "10.1.2.3", PLAIN) == \
        "calling AE title bound to a certificate, association not over TLS"
    assert rules.refusal("CT01", "10.1.2.3", Channel(True, None)) == \
        "calling AE title bound to a certificate, none presented"


def test_unbound_titles_follow_the_allow_list_on_either_port() -> None:
    assert bound().refusal("US01", "10.1.2.3", PLAIN) is None
    assert bound().refusal("US01", "10.1.2.3", Channel(True, CT01_CERT)) is None
    listed = bound("CT01,US01")
    assert listed.refusal("US01", "10.1.2.3", PLAIN) is None
    assert listed.refusal("XA01", "10.1.2.3", Channel(True, CT01_CERT)) == "calling AE title not on the allow-list"


def test_a_bound_title_must_also_be_on_the_allow_list() -> None:
    assert bound("US01").refusal("CT01", "10.1.2.3", Channel(True, CT01_CERT)) == \
        "calling AE title not on the allow-list"
    assert bound("CT01@10.0.0.5").refusal("CT01", "10.0.0.6", Channel(True, CT01_CERT)) == \
        "calling AE title not on the allow-list"
