"""The compose file (Docker cannot run here): services, how they are built, and the env they get."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_has_the_four_services() -> None:
    """`docker compose up` (no profile) starts these four; the `cluster` profile's services only with it."""
    default = {name for name, service in compose()["services"].items() if not service.get("profiles")}
    assert default == {"redis", "postgres", "broker", "worker"}


def test_the_cluster_profile_adds_a_node_a_worker_and_haproxy_with_its_config() -> None:
    services = compose()["services"]
    cluster = {name for name, service in services.items() if "cluster" in service.get("profiles", [])}
    assert cluster == {"broker2", "worker2", "haproxy"}
    assert services["broker2"]["environment"] == services["broker"]["environment"]
    assert services["worker2"]["environment"] == services["worker"]["environment"]
    assert services["broker2"]["depends_on"]["broker"]["condition"] == "service_healthy"  # node 1 migrates
    assert "/readyz" in " ".join(services["broker"]["healthcheck"]["test"])
    [mount] = services["haproxy"]["volumes"]
    source, target = mount.split(":")[:2]
    assert target == "/usr/local/etc/haproxy/haproxy.cfg" and (ROOT / source).is_file()
    config = (ROOT / source).read_text()
    env = services["broker"]["environment"]
    for port in (env["BROKER_HL7_PORT"], env["BROKER_DICOM_PORT"], env["BROKER_HTTP_PORT"]):
        assert f"broker:{port}" in config and f"broker2:{port}" in config and f"bind :{port}" in config
    assert "option httpchk GET /readyz" in config and "on-marked-down shutdown-sessions" in config


def test_broker_and_worker_are_built_from_the_repo_dockerfile() -> None:
    services = compose()["services"]
    assert (ROOT / "Dockerfile").exists()
    for name in ("broker", "worker"):
        assert services[name]["build"] == "."
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["broker"]' in dockerfile
    assert services["worker"]["command"] == ["worker"]
    assert "broker db upgrade" in " ".join(services["broker"]["entrypoint"])


def test_broker_and_worker_use_postgres_and_redis_by_service_name() -> None:
    services = compose()["services"]
    for name in ("broker", "worker"):
        env = services[name]["environment"]
        assert env["BROKER_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert "@postgres:5432/" in env["BROKER_DATABASE_URL"]
        assert env["BROKER_REDIS_URL"] == "redis://redis:6379/0"
        assert set(services[name]["depends_on"]) >= {"postgres", "redis"}
    pg_env = services["postgres"]["environment"]
    user, password = pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"]
    assert f"//{user}:{password}@" in services["broker"]["environment"]["BROKER_DATABASE_URL"]


def test_broker_publishes_the_configured_ports() -> None:
    broker = compose()["services"]["broker"]
    env = broker["environment"]
    published = {p.split(":")[1] for p in broker["ports"]}
    assert published == {env["BROKER_HL7_PORT"], env["BROKER_DICOM_PORT"], env["BROKER_HTTP_PORT"]}
