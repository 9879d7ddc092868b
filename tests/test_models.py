"""Loading models safely: safetensors only, and a model's own code only when a job asks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tuneq.schemas.errors import ModelError
from tuneq.schemas.specs import FinetuneSpec, ScoreSpec
from tuneq.worker.ml.models import load_classifier

CUSTOM_CODE = """
from pathlib import Path

from transformers import BertConfig, BertForSequenceClassification

Path(MARKER).touch()  # proof that this file was executed


class CustomConfig(BertConfig):
    model_type = "tuneq-custom"


class CustomModel(BertForSequenceClassification):
    config_class = CustomConfig
"""


@pytest.fixture
def custom_code_model(tiny_model: Path, tmp_path: Path) -> Path:
    """The tiny BERT, declared as a custom architecture whose code ships in the folder."""
    folder = tmp_path / "custom"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "tuneq-custom"
    config["auto_map"] = {
        "AutoConfig": "modeling_custom.CustomConfig",
        "AutoModelForSequenceClassification": "modeling_custom.CustomModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code-ran"
    (folder / "modeling_custom.py").write_text(CUSTOM_CODE.replace("MARKER", repr(str(marker))))
    return folder


def test_a_models_own_code_runs_only_when_the_job_asks(custom_code_model: Path) -> None:
    with pytest.raises(ModelError) as caught:
        load_classifier("custom", str(custom_code_model))
    assert str(caught.value) == (
        "model 'custom' ships its own Python code (auto_map in its config.json), which tuneq "
        "runs only when the job asks: set trust_remote_code: true in the job file (or pass "
        "--trust-remote-code), and only for a model whose code you trust"
    )
    marker = custom_code_model.parent / "code-ran"
    assert not marker.exists()
    model = load_classifier("custom", str(custom_code_model), trust_remote_code=True)
    assert type(model).__name__ == "CustomModel"
    assert marker.exists()


def test_remote_code_is_off_unless_a_spec_turns_it_on() -> None:
    assert FinetuneSpec(data="imdb").trust_remote_code is False
    assert ScoreSpec(model="m", input="/a.csv", output="/b.csv").trust_remote_code is False
    assert FinetuneSpec(data="imdb", trust_remote_code=True).trust_remote_code is True


def test_pickled_weights_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError) as caught:
        load_classifier("pickled", str(folder))
    assert str(caught.value).startswith(
        "model 'pickled' has no .safetensors weights (only pytorch_model.bin, a pickle "
        "format); tuneq loads safetensors only, because unpickling weights can run code."
    )


@pytest.mark.parametrize("declared", [None, "bfloat16"])
def test_a_checkpoint_saved_in_bf16_loads_in_fp32(
    tiny_model: Path, tmp_path: Path, declared: str | None
) -> None:
    """Fine-tuning keeps fp32 master weights even where the Hub checkpoint is bf16 (saved so,
    with or without the dtype in its config): transformers 5 would keep it in bf16."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "bf16"
    shutil.copytree(tiny_model, folder)
    weights = load_file(folder / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    if declared:
        config["dtype"] = declared
    (folder / "config.json").write_text(json.dumps(config))
    model = load_classifier("bf16", str(folder), num_labels=2)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
