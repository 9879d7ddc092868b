"""compose.yaml, checked by parsing (Docker cannot run on the test machines)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.conftest import REPO


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "compose.yaml").read_text())


def test_workers_wait_for_healthy_services_and_migrations(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("redis", "postgres"):
        assert "test" in services[name]["healthcheck"]
    for name in ("worker-cpu", "worker-gpu"):
        depends = services[name]["depends_on"]
        assert depends["redis"] == {"condition": "service_healthy"}
        assert depends["postgres"] == {"condition": "service_healthy"}
        assert depends["migrate"] == {"condition": "service_completed_successfully"}
    assert services["migrate"]["command"] == ["tuneq", "db", "upgrade"]


def test_redis_keeps_messages(compose: dict[str, Any]) -> None:
    command = compose["services"]["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert "--requirepass" in command


def test_secrets_are_required_not_defaulted(compose: dict[str, Any]) -> None:
    env = compose["services"]["worker-cpu"]["environment"]
    assert "${REDIS_PASSWORD:?" in env["TUNEQ_BROKER_URL"]
    assert "${POSTGRES_PASSWORD:?" in env["TUNEQ_DATABASE_URL"]


def test_every_tuneq_variable_is_a_setting_tuneq_reads(compose: dict[str, Any]) -> None:
    """tuneq refuses unknown TUNEQ_* variables, so the file must name only real ones."""
    from tuneq.schemas.settings import Settings

    known = {"TUNEQ_" + name.upper() for name in Settings.model_fields}
    for service in ("migrate", "worker-cpu", "worker-gpu", "ui"):
        assert set(compose["services"][service]["environment"]) <= known
    interpolated = re.findall(r"\$\{(\w+)", (REPO / "compose.yaml").read_text())
    assert "REDIS_PASSWORD" in interpolated
    assert not [name for name in interpolated if name.startswith("TUNEQ_")]


def test_workers_share_artifacts_and_the_gpu_worker_reserves_a_gpu(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    for name in ("worker-cpu", "worker-gpu"):
        assert "artifacts:/artifacts" in services[name]["volumes"]
        assert services[name]["environment"]["TUNEQ_ALLOWED_ROOTS"] == "/data"
        assert services[name]["environment"]["TUNEQ_ARTIFACT_DIR"] == "/artifacts"
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    command = services["worker-gpu"]["command"]
    assert command[command.index("--gpu") + 1] == "0"  # one GPU, a fresh process per job


def test_stopped_workers_hand_fine_tunes_back_within_their_grace_period(
    compose: dict[str, Any],
) -> None:
    """Docker kills a container 10 s after SIGTERM unless told otherwise: a worker hands its
    fine-tune back (a step and a checkpoint's write) within a longer grace period."""
    for name in ("worker-cpu", "worker-gpu"):
        service = compose["services"][name]
        assert service["environment"]["TUNEQ_HAND_BACK_ON_STOP"] == "true"
        assert service["environment"]["TUNEQ_DATABASE_URL"].startswith("postgresql://")
        minutes = re.fullmatch(r"(\d+)m", service["stop_grace_period"])
        assert minutes and int(minutes.group(1)) >= 1
    assert "TUNEQ_HAND_BACK_ON_STOP" not in compose["services"]["ui"]["environment"]


def test_the_dashboard_needs_a_token_and_listens_on_loopback_only(compose: dict[str, Any]) -> None:
    ui = compose["services"]["ui"]
    assert ui["command"][:2] == ["tuneq", "ui"]
    assert "${UI_TOKEN:?" in ui["environment"]["TUNEQ_UI_TOKEN"]
    assert ui["environment"]["TUNEQ_DATABASE_URL"].startswith("postgresql://")  # the workers'
    assert ui["ports"] == ["127.0.0.1:8600:8600"]
    assert ui["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}


def test_the_image_copies_every_package_and_sets_only_real_settings() -> None:
    """The Dockerfile (which compose.yaml builds) copies each folder pyproject.toml packages,
    and its ENV lines name only settings tuneq reads."""
    import tomllib

    from tuneq.schemas.settings import Settings

    dockerfile = (REPO / "Dockerfile").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    folders = set(project["tool"]["setuptools"]["package-dir"].values())
    copied = set(re.findall(r"^COPY (\w+) \./\1$", dockerfile, flags=re.M))
    assert folders <= copied, folders - copied
    known = {"TUNEQ_" + name.upper() for name in Settings.model_fields}
    assert set(re.findall(r"^ENV (TUNEQ_\w+)=", dockerfile, flags=re.M)) <= known
    assert "python -m tuneq.worker.ml.kernels" in dockerfile  # the kernels, built in
