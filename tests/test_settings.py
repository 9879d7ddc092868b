import importlib.util
from pathlib import Path

import pytest

from tuneq.schemas.errors import ConfigError
from tuneq.schemas.settings import load_settings, redact_url


def test_defaults_keep_everything_under_one_data_dir(tmp_path: Path) -> None:
    settings = load_settings({"TUNEQ_DATA_DIR": str(tmp_path)})
    assert settings.database_url == f"sqlite:///{tmp_path / 'tuneq.db'}"
    assert settings.broker_url == f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    assert settings.artifact_dir == tmp_path / "artifacts"
    assert settings.kernel_cache == tmp_path / "kernels"
    assert settings.attention_kernel
    assert settings.keep_freed_memory
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
            "TUNEQ_KERNEL_CACHE": str(tmp_path / "compiled"),
            "TUNEQ_ATTENTION_KERNEL": "off",
            "TUNEQ_KEEP_FREED_MEMORY": "false",
        }
    )
    assert settings.kernel_cache == tmp_path / "compiled"
    assert not settings.attention_kernel
    assert not settings.keep_freed_memory
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


def test_an_artifact_store_is_an_fsspec_uri(tmp_path: Path) -> None:
    base = {"TUNEQ_DATA_DIR": str(tmp_path)}
    assert load_settings(base).artifact_store == ""
    settings = load_settings({**base, "TUNEQ_ARTIFACT_STORE": " file:///srv/tuneq/ "})
    assert settings.artifact_store == "file:///srv/tuneq"
    assert settings.artifact_dir == tmp_path / "artifacts"  # still the local cache and staging


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "/srv/tuneq",
            "'/srv/tuneq' is not a store URI; give one like s3://bucket/prefix or "
            "file:///srv/tuneq (for a plain folder, set TUNEQ_ARTIFACT_DIR instead)",
        ),
        ("nope://bucket", "fsspec knows no protocol 'nope' (in 'nope://bucket')"),
        (
            "s3://bucket/tuneq",
            "s3:// needs a package that this Python lacks: Install s3fs to access S3 (pip "
            "install it on every machine that runs tuneq)",
        ),
        (
            "ftp://tuneq:secret@files/tuneq",
            "ftp://tuneq:***@files/tuneq carries credentials, which tuneq would record in the "
            "job database; give them the way the filesystem reads them instead (for s3://, "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or an AWS profile)",
        ),
    ],
)
def test_a_bad_artifact_store_says_what_to_do(tmp_path: Path, value: str, message: str) -> None:
    if value.startswith("s3:") and importlib.util.find_spec("s3fs"):
        pytest.skip("s3fs is installed here")
    with pytest.raises(ConfigError) as caught:
        load_settings({"TUNEQ_DATA_DIR": str(tmp_path), "TUNEQ_ARTIFACT_STORE": value})
    assert str(caught.value) == f"invalid setting: TUNEQ_ARTIFACT_STORE: {message}"
    assert "secret" not in str(caught.value)
