"""The fine-tune work function on its own: a tiny BERT, a real Trainer, a saved folder."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import LEARNS
from tuneq.schemas.specs import FinetuneSpec, default_learning_rate
from tuneq.worker.ml import cpu_adamw_rows
from tuneq.worker.ml.finetune import MANIFEST, finetune
from tuneq.worker.ml.predict import predict_texts


def test_finetune_saves_a_labelled_safetensors_model(
    tiny_model: Path, reviews_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model"
    out.mkdir()
    progress: list[dict] = []
    spec = FinetuneSpec(
        data=str(reviews_csv),
        model=str(tiny_model),
        epochs=8,
        learning_rate=2e-3,
        train_size=120,
        eval_size=40,
        batch_size=16,
        name="tiny",
    )
    result = finetune(spec, out, on_progress=progress.append)

    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "confusion.png",
        "loss.png",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        MANIFEST,
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}

    metrics = result.metrics
    assert metrics["accuracy"] >= 0.9
    assert metrics["data"]["train_rows"] == 120 and metrics["data"]["eval_rows"] == 40
    assert metrics["train_steps"] == 8 * -(-120 // 16)  # 8 epochs of 8 batches
    evaluated_at = [point["step"] for point in metrics["eval_curve"]]
    assert evaluated_at == [8, 16, 24, 32, 40, 48, 56, 64], "after each epoch; the last at the end"
    assert metrics["eval_curve"][-1]["loss"] == round(metrics["eval_loss"], 5)
    assert metrics["plots"] == ["loss.png", "confusion.png"]
    assert metrics["loss_curve"][0]["loss"] > metrics["loss_curve"][-1]["loss"]
    # the word embeddings' update ran in tuneq's kernel where it runs (the CPU has AVX2)
    assert metrics["training"]["embedding_rows_adamw"] is (cpu_adamw_rows.library() is not None)
    assert set(result.phases) == {
        "load_data",
        "load_model",
        "tokenize",
        "train",
        "eval",
        "save",
        "plots",
    }

    steps = [p["step"] for p in progress if p.get("phase") == "training"]
    assert steps[0] == 0 and steps[-1] == metrics["train_steps"]
    assert [p["phase"] for p in progress if "step" not in p] == [
        "loading data",
        "loading model",
        "tokenizing",
        "saving",
    ]
    evaluated = [p["step"] for p in progress if p.get("phase") == "evaluating"]
    assert evaluated == [8, 16, 24, 32, 40, 48, 56, 64], "reported as each evaluation starts"

    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["labels"] == ["negative", "positive"]
    assert manifest["data_fingerprint"] == result.fingerprint
    assert manifest["spec"]["train_size"] == 120
    assert {"torch", "transformers", "python"} <= set(manifest["versions"])

    texts = ["brilliant superb film", "worst dull plot"]
    assert [p.label for p in predict_texts(out, texts)] == ["positive", "negative"]


def test_the_same_seed_gives_the_same_model(
    tiny_model: Path, reviews_csv: Path, tmp_path: Path
) -> None:
    spec = FinetuneSpec(data=str(reviews_csv), model=str(tiny_model), train_size=120, **LEARNS)
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        runs.append(finetune(spec, tmp_path / name).metrics)
    assert runs[0]["loss_curve"] == runs[1]["loss_curve"]
    assert runs[0]["eval_loss"] == runs[1]["eval_loss"]


def test_attention_dropout_is_off_unless_asked(tiny_model: Path, reviews_csv: Path, tmp_path):
    """The default turns the model's attention dropout (BERT's 0.1) off and records that; an
    explicit value replaces it; nothing else of the model's regularisation changes."""
    runs = {}
    for name, asked in (("default", {}), ("asked", {"attention_dropout": 0.05})):
        spec = FinetuneSpec(data=str(reviews_csv), model=str(tiny_model), train_size=120, **asked)
        spec = spec.model_copy(update=LEARNS)
        result = finetune(spec, tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        manifest = json.loads((tmp_path / name / MANIFEST).read_text())
        card = (tmp_path / name / "README.md").read_text()
        runs[name] = (
            config["attention_probs_dropout_prob"],
            config["hidden_dropout_prob"],
            result.metrics["training"]["attention_dropout"],
            manifest["spec"]["attention_dropout"],
            card.split("| Attention dropout | ")[1].split(" |")[0],
        )
    assert runs["default"] == (0.0, 0.1, 0.0, 0.0, "0")
    assert runs["asked"] == (0.05, 0.1, 0.05, 0.05, "0.05")


def test_a_model_without_attention_dropout_trains_as_it_is(
    tiny_model: Path, reviews_csv: Path, tmp_path: Path
):
    """GPT-2 names its attention dropout otherwise (attn_pdrop): the default leaves it alone,
    and asking for a value is refused before anything trains."""
    import pytest
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from tuneq.schemas.errors import ModelError

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    gpt2 = tmp_path / "tiny-gpt2"
    config = GPT2Config(
        vocab_size=tokenizer.vocab_size,
        n_positions=256,
        n_embd=16,
        n_layer=1,
        n_head=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    GPT2ForSequenceClassification(config).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    # trained until it learns (LEARNS): one epoch of 60 rows learned or not by the luck of the
    # random draws (it failed on the AVX2 EPYC, with torch's dropout as with tuneq's)
    spec = FinetuneSpec(data=str(reviews_csv), model=str(gpt2), train_size=60, **LEARNS)
    result = finetune(spec, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["attn_pdrop"] == 0.1
    assert result.metrics["training"]["attention_dropout"] is None
    assert "| Attention dropout | the model's own |" in (tmp_path / "out" / "README.md").read_text()
    with pytest.raises(ModelError, match="no attention dropout setting"):
        finetune(spec.model_copy(update={"attention_dropout": 0.0}), tmp_path / "refused")
    assert not (tmp_path / "refused" / "model.safetensors").exists()


def test_the_same_spec_trains_the_same_model(tiny_model: Path, reviews_csv: Path, tmp_path: Path):
    """The seed covers the new head too, whatever the process drew from its RNG before."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    base = tmp_path / "encoder-only"  # like MiniLM: no classification head to start from
    AutoModel.from_pretrained(tiny_model).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(base)
    spec = FinetuneSpec(data=str(reviews_csv), model=str(base), train_size=120, **LEARNS)
    first = finetune(spec, tmp_path / "first")
    torch.rand(1000)  # as a worker process that ran other jobs before would have
    second = finetune(spec, tmp_path / "second")
    assert first.metrics["eval_loss"] == second.metrics["eval_loss"]
    assert (tmp_path / "first" / "model.safetensors").read_bytes() == (
        tmp_path / "second" / "model.safetensors"
    ).read_bytes()


def test_the_default_learning_rate_is_chosen_from_the_training_rows(
    trained_tiny_model: Path, reviews_csv: Path, tmp_path: Path
) -> None:
    """No learning rate given: the run takes the default for its training rows and says so in
    its metrics, its manifest and its model card. (The tiny BERT barely moves at 1e-4 from
    scratch, so this run goes on from the one already fine-tuned on the same reviews.)"""
    spec = FinetuneSpec(
        data=str(reviews_csv), model=str(trained_tiny_model), train_size=40, eval_size=20,
        epochs=1, batch_size=16,
    )  # fmt: skip
    assert spec.learning_rate is None
    result = finetune(spec, tmp_path)

    assert result.metrics["data"]["train_rows"] == 40
    assert result.metrics["training"]["learning_rate"] == default_learning_rate(40) == 1e-4
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["spec"]["learning_rate"] == 1e-4
    assert manifest["training"]["learning_rate"] == 1e-4
    assert "| Learning rate | 0.0001 |" in (tmp_path / "README.md").read_text()


def test_the_default_length_fits_the_data(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    from tuneq.worker.ml.finetune import choose_max_length

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    short = [f"a short sentence number {i}" for i in range(200)]
    assert choose_max_length(tokenizer, short) == 16, "no less than 16"
    tweets = [" ".join(["word"] * (20 + i % 30)) for i in range(200)]
    assert choose_max_length(tokenizer, tweets) == 56, "99th percentile: 49 words + 2, to 8s"
    reviews = [" ".join(["word"] * 900) for _ in range(10)]
    assert choose_max_length(tokenizer, reviews) == 256, "long reviews keep 256"


def test_the_live_loss_curve_is_thinned_to_a_few_hundred_points_and_keeps_the_newest() -> None:
    from tuneq.worker.ml.finetune import CURVE_POINTS, thinned

    points = [[step, 1.0 / step] for step in range(1, 1001)]
    kept = thinned(points)
    assert len(kept) <= CURVE_POINTS and kept[0] == points[0] and kept[-1] == points[-1]
    assert [p[0] for p in kept] == sorted({p[0] for p in kept})
    assert thinned(points[:5]) == points[:5]
