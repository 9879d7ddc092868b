"""One settings object, read from ``TUNEQ_*`` environment variables at the edges.

The CLI entry point and the worker start-up call :func:`load_settings`; everything below them
receives plain values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tuneq.schemas.errors import ConfigError

ENV_PREFIX = "TUNEQ_"


def default_data_dir(env: Mapping[str, str]) -> Path:
    """``$XDG_DATA_HOME/tuneq``, or ``~/.local/share/tuneq``."""
    base = env.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "tuneq"


class Settings(BaseModel):
    """Where tuneq keeps its state; every field is set by ``TUNEQ_<FIELD>``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data_dir: Path = Field(description="Folder for the default database, broker and artifacts.")
    database_url: str = Field(
        "", description="SQLAlchemy URL of the job database; default: SQLite in data_dir."
    )
    broker_url: str = Field(
        "", description="Celery broker URL (redis://…); default: an embedded SQLite broker."
    )
    artifact_dir: Path = Field(
        Path(), description="Folder where models and outputs are written; default: data_dir."
    )
    artifact_store: str = Field(
        "",
        description="fsspec URI (s3://bucket/prefix, gs://…, file:///…) where models and scoring "
        "work live, shared by every machine; default: none, artifact_dir is the store.",
    )
    worker_threads: int = Field(
        0,
        ge=0,
        description="torch threads per worker process; 0 means a share of the machine's cores "
        "among every tuneq worker process running on it.",
    )
    attention_kernel: bool = Field(
        True,
        description="bf16 scoring on a CPU with AVX512-BF16 uses tuneq's own attention kernel "
        "where, timed at start, it beats torch's; false keeps torch's everywhere.",
    )
    norm_kernel: bool = Field(
        True,
        description="bf16 scoring on a CPU with AVX512-BF16 computes each BERT-family block's "
        "residual add and LayerNorm in one pass with tuneq's own kernel; false keeps torch's.",
    )
    dropout_kernel: bool = Field(
        True,
        description="fine-tunes on a CPU with AVX2 draw dropout with tuneq's own kernel (the "
        "same distribution, from a faster generator); false keeps torch's.",
    )
    clip_in_optimizer: bool = Field(
        True,
        description="fine-tunes on the CPU with fused AdamW rescale clipped gradients in the "
        "optimizer's own pass over them instead of a pass before it; false clips as the "
        "Trainer does.",
    )
    sparse_embedding_grad: bool = Field(
        True,
        description="fine-tunes on the CPU with fused AdamW make the word embeddings' gradient "
        "from the rows a batch touched, not the whole vocabulary's; false keeps the dense "
        "backward.",
    )
    embedding_rows_adamw: bool = Field(
        True,
        description="where the word embeddings' gradient comes as the rows a batch touched, "
        "tuneq's AdamW kernel updates the rows no batch has touched yet by their weight decay "
        "alone, as torch's AdamW would; false updates every row with torch's.",
    )
    first_token_only: bool = Field(
        True,
        description="a BERT-family classifier whose head reads only the first token ([CLS]) "
        "computes its last layer for that token alone, in fine-tunes and scoring (the same "
        "logits and gradients); false computes every position.",
    )
    keep_freed_memory: bool = Field(
        True,
        description="worker processes keep the memory a fine-tune step frees for the next step "
        "instead of returning it to the kernel (glibc only), and give it back after each job; "
        "false keeps glibc's defaults.",
    )
    hand_back_on_stop: bool = Field(
        False,
        description="when the worker is asked to stop (SIGTERM, Ctrl-C once), a running "
        "fine-tune saves a checkpoint at the end of its step and goes back to the queue, to "
        "resume from it on the next worker, instead of training to its end first; for workers "
        "that an orchestrator kills after a grace period.",
    )
    kernel_cache: Path = Field(
        Path(),
        description="Folder where tuneq's C kernels are compiled once per machine; default: "
        "data_dir/kernels.",
    )
    heartbeat_s: float = Field(
        5.0, gt=0, description="How often a running job renews its lease (seconds)."
    )
    lease_timeout_s: float = Field(
        120.0, gt=0, description="A job or shard whose lease is older than this is requeued."
    )
    max_attempts: int = Field(
        3, ge=1, description="Attempts before a job whose worker keeps dying is failed."
    )
    requeue_after_s: float = Field(
        300.0, gt=0, description="A queued job unclaimed this long is published again."
    )
    reap_interval_s: float = Field(
        15.0, gt=0, description="How often each worker looks for lost jobs and messages."
    )
    allowed_roots: tuple[Path, ...] = Field(
        (),
        description="Folders, separated by ':', inside which jobs may read data and models "
        "and write outputs; default: data_dir and the worker's working directory.",
    )
    ui_token: str = Field(
        "",
        description="The token `tuneq ui` asks of every action (cancel, retry, tag, submit); "
        "default: a new one, printed when the dashboard starts.",
    )

    ui_hosts: tuple[str, ...] = Field(
        (),
        description="Host names, separated by ',', under which people reach `tuneq ui` (a "
        "proxy's public name, this machine's name on the network); requests naming another "
        "host are refused. Default: localhost and the address it listens on.",
    )

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part for part in value.split(os.pathsep) if part.strip())
        return value

    @field_validator("ui_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip().lower() for part in value.split(",") if part.strip())
        return value

    @field_validator("database_url", "broker_url")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip()

    @field_validator("artifact_store")
    @classmethod
    def _check_store(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value:
            check_store_uri(value)
        return value

    def model_post_init(self, _context: object) -> None:
        data_dir = self.data_dir.expanduser().resolve()
        object.__setattr__(self, "data_dir", data_dir)
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{data_dir / 'tuneq.db'}")
        if not self.broker_url:
            object.__setattr__(self, "broker_url", f"sqla+sqlite:///{data_dir / 'broker.db'}")
        artifact_dir = self.artifact_dir if str(self.artifact_dir) not in ("", ".") else None
        resolved = (artifact_dir or data_dir / "artifacts").expanduser().resolve()
        object.__setattr__(self, "artifact_dir", resolved)
        kernel_cache = self.kernel_cache if str(self.kernel_cache) not in ("", ".") else None
        resolved = (kernel_cache or data_dir / "kernels").expanduser().resolve()
        object.__setattr__(self, "kernel_cache", resolved)
        roots = self.allowed_roots or (data_dir, Path.cwd())
        real = tuple(dict.fromkeys(Path(os.path.realpath(p.expanduser())) for p in roots))
        object.__setattr__(self, "allowed_roots", real)

    @property
    def uses_embedded_broker(self) -> bool:
        return self.broker_url.startswith("sqla+sqlite")


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``TUNEQ_*`` variables; fail loudly on unknown or bad ones."""
    env = os.environ if env is None else env
    values: dict[str, str] = {}
    known = set(Settings.model_fields)
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        field = key[len(ENV_PREFIX) :].lower()
        if field not in known:
            names = ", ".join(ENV_PREFIX + name.upper() for name in sorted(known))
            raise ConfigError(f"unknown setting {key}; tuneq reads {names}")
        values[field] = value
    values.setdefault("data_dir", str(default_data_dir(env)))
    try:
        return Settings(**values)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"{ENV_PREFIX}{str(err['loc'][0]).upper()}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid setting: {problems}") from None


def check_store_uri(uri: str) -> None:
    """Fail unless ``uri`` is an fsspec URI whose filesystem is installed and that carries no
    credentials (it is recorded in the job database as the path of every stored model)."""
    import fsspec
    from fsspec.core import split_protocol

    protocol, rest = split_protocol(uri)
    if protocol is None or not rest.strip("/"):
        raise ValueError(
            f"{uri!r} is not a store URI; give one like s3://bucket/prefix or file:///srv/tuneq "
            "(for a plain folder, set TUNEQ_ARTIFACT_DIR instead)"
        )
    if "@" in rest.split("/", 1)[0]:
        raise ValueError(
            f"{redact_url(uri)} carries credentials, which tuneq would record in the job "
            "database; give them the way the filesystem reads them instead (for s3://, "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or an AWS profile)"
        )
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        raise ValueError(
            f"{protocol}:// needs a package that this Python lacks: {exc} (pip install it on "
            "every machine that runs tuneq)"
        ) from None
    except ValueError:
        raise ValueError(f"fsspec knows no protocol {protocol!r} (in {uri!r})") from None


def redact_url(url: str) -> str:
    """``url`` with its password hidden, for messages and logs."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.rsplit("@", 1)[-1]
