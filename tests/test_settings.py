from pathlib import Path

import pytest

from tuneq.schemas.errors import ConfigError
from tuneq.schemas.settings import load_settings, redact_url


def test_defaults_keep_everything_under_one_data_dir(tmp_path: Path) -> None:
    settings = load_settings({"TUNEQ_DATA_DIR": str(tmp_path)})
    assert settings.database_url == f"sqlite:///{tmp_path / 'tuneq.db'}"
    assert settings.broker_url == f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    assert settings.artifact_dir == tmp_path / "artifacts"
    assert settings.uses_embedded_broker


def test_data_dir_defaults_to_xdg_data_home(tmp_path: Path) -> None:
    settings = load_settings({"XDG_DATA_HOME": str(tmp_path)})
    assert settings.data_dir == tmp_path / "tuneq"


def test_urls_and_artifact_dir_come_from_the_environment(tmp_path: Path) -> None:
    settings = load_settings(
        {
            "TUNEQ_DATA_DIR": str(tmp_path),
            "TUNEQ_DATABASE_URL": "postgresql://tuneq@db/tuneq",
            "TUNEQ_BROKER_URL": " redis://:secret@redis:6379/0 ",
            "TUNEQ_ARTIFACT_DIR": str(tmp_path / "shared"),
        }
    )
    assert settings.database_url == "postgresql://tuneq@db/tuneq"
    assert settings.broker_url == "redis://:secret@redis:6379/0"
    assert settings.artifact_dir == tmp_path / "shared"
    assert not settings.uses_embedded_broker


def test_a_misspelt_setting_fails_loudly() -> None:
    with pytest.raises(ConfigError, match="unknown setting TUNEQ_BROKER; tuneq reads"):
        load_settings({"TUNEQ_BROKER": "redis://x"})


def test_a_bad_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"TUNEQ_DATA_DIR": str(tmp_path), "TUNEQ_WORKER_THREADS": "many"})
    assert str(caught.value).startswith("invalid setting: TUNEQ_WORKER_THREADS:")


def test_passwords_are_hidden_in_messages() -> None:
    assert redact_url("redis://:secret@redis:6379/0") == "redis://:***@redis:6379/0"
