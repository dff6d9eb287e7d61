"""Settings: the YAML holds every default, env variables override, a bad value is one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from broker.config import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("BROKER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(ROOT)


def test_yaml_documents_every_setting_with_the_model_default() -> None:
    data = yaml.safe_load((ROOT / "config" / "broker.yaml").read_text())
    assert set(data) == set(Settings.model_fields)
    defaults = Settings.model_construct()
    for name, value in data.items():
        assert str(getattr(defaults, name)) == str(value), name


def test_readme_documents_every_setting_by_its_environment_variable() -> None:
    readme = (ROOT / "README.md").read_text()
    undocumented = [name for name in Settings.model_fields if f"| `BROKER_{name.upper()}` |" not in readme]
    assert undocumented == []


def test_fixed_names_and_defaults() -> None:
    s = load_settings()
    assert (s.hl7_port, s.dicom_port, s.ae_title, s.http_port) == (2575, 11112, "BROKER", 8080)
    assert s.database_url.startswith("sqlite:///./var/") and s.redis_url == ""


def test_environment_overrides_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_HL7_PORT", "2576")
    monkeypatch.setenv("BROKER_AE_TITLE", "WL1")
    monkeypatch.setenv("BROKER_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    monkeypatch.setenv("BROKER_REDIS_URL", "redis://127.0.0.1:6379/0")
    s = load_settings()
    assert (s.hl7_port, s.ae_title, s.redis_url) == (2576, "WL1", "redis://127.0.0.1:6379/0")


def test_broker_config_names_another_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("dicom_port: 104\nae_title: SITEWL\n")
    monkeypatch.setenv("BROKER_CONFIG", str(path))
    s = load_settings()
    assert (s.dicom_port, s.ae_title, s.hl7_port) == (104, "SITEWL", 2575)


@pytest.mark.parametrize(("name", "value", "words"), [
    ("BROKER_HL7_PORT", "abc", "BROKER_HL7_PORT='abc'"),
    ("BROKER_DICOM_PORT", "70000", "BROKER_DICOM_PORT='70000'"),
    ("BROKER_AE_TITLE", "A_TITLE_LONGER_THAN_16", "BROKER_AE_TITLE"),
    ("BROKER_DATABASE_URL", "mysql://x", "BROKER_DATABASE_URL"),
    ("BROKER_LOG_FORMAT", "xml", "BROKER_LOG_FORMAT"),
    ("BROKER_DICOM_ALLOWED_CALLERS", "CT01,@10.0.0.1", "each entry is AE or AE@host"),
    ("BROKER_DICOM_ALLOWED_CALLERS", "CT01@", "each entry is AE or AE@host"),
    ("BROKER_MWL_HIDDEN_STATUSES", "STARTED,FINISHED", "unknown SPS status 'FINISHED'"),
    ("BROKER_DICOM_MAX_PDU", "1000", "at least 4096"),
    ("BROKER_DICOM_MAX_ASSOCIATIONS", "0", "BROKER_DICOM_MAX_ASSOCIATIONS"),
])
def test_bad_setting_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, name: str, value: str,
                                       words: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert words in message and "\n" not in message


def test_missing_named_config_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_CONFIG", "/nonexistent/broker.yaml")
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings()


def test_unknown_key_in_yaml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("hl7_prot: 1\n")
    monkeypatch.setenv("BROKER_CONFIG", str(path))
    with pytest.raises(SettingsError, match=r"hl7_prot.*unknown setting"):
        load_settings()


def test_comma_separated_settings_are_read_as_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_DICOM_ALLOWED_CALLERS", " CT01 , MR1@10.0.0.5,")
    monkeypatch.setenv("BROKER_MWL_HIDDEN_STATUSES", "COMPLETED, CANCELED")
    s = load_settings()
    assert s.allowed_callers == [("CT01", ""), ("MR1", "10.0.0.5")]
    assert s.hidden_statuses == frozenset({"COMPLETED", "CANCELED"})


def test_tls_settings_are_checked_together(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A TLS port needs a certificate and key, a TLS peer must be a peer, an AE binding needs a CA."""
    ca = tmp_path / "ca.pem"
    ca.write_text("not read here")
    monkeypatch.setenv("BROKER_DICOM_PEERS", "ARCHIVE@10.0.0.9:104,SUB@10.0.0.8:104")
    monkeypatch.setenv("BROKER_DICOM_TLS_PEERS", "ARCHIVE")
    monkeypatch.setenv("BROKER_TLS_CA_BUNDLE", str(ca))
    assert load_settings().tls_peers == frozenset({"ARCHIVE"})
    monkeypatch.setenv("BROKER_DICOM_TLS_PEERS", "PACS")
    with pytest.raises(SettingsError, match="BROKER_DICOM_TLS_PEERS: 'PACS' is not one of BROKER_DICOM_PEERS"):
        load_settings()
    monkeypatch.delenv("BROKER_DICOM_TLS_PEERS")
    monkeypatch.setenv("BROKER_DICOM_TLS_PORT", "2762")
    with pytest.raises(SettingsError, match="BROKER_DICOM_TLS_PORT needs BROKER_TLS_CERTIFICATE"):
        load_settings()
    monkeypatch.delenv("BROKER_DICOM_TLS_PORT")
    monkeypatch.delenv("BROKER_TLS_CA_BUNDLE")
    monkeypatch.setenv("BROKER_DICOM_TLS_AE_CERTIFICATES", "CT01=cn:ct01.example.org")
    with pytest.raises(SettingsError, match="needs BROKER_TLS_CA_BUNDLE"):
        load_settings()
