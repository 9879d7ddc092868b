import pytest
from pydantic import ValidationError

from tuneq.schemas.specs import FinetuneSpec, ScoreSpec, default_learning_rate, parse_spec


def test_defaults_are_the_ones_the_quality_benchmark_chose() -> None:
    spec = FinetuneSpec(data="reviews.csv")
    assert (spec.model, spec.batch_size, spec.max_length) == ("minilm", 8, None)  # None: fit data
    assert (spec.epochs, spec.learning_rate, spec.warmup) == (3.0, None, 0.1)  # None: fit data
    assert (spec.chosen_metric(), spec.patience, spec.task) == ("macro_f1", None, "classification")
    assert spec.queue is None and spec.device == "auto"


@pytest.mark.parametrize(
    ("train_rows", "rate"), [(800, 1e-4), (1839, 1e-4), (2999, 1e-4), (3000, 5e-5), (10_000, 5e-5)]
)
def test_the_default_learning_rate_falls_with_the_training_rows(train_rows: int, rate: float):
    assert default_learning_rate(train_rows) == rate


@pytest.mark.parametrize(
    ("data", "name"),
    [
        ("imdb", "imdb-classifier"),
        ("../shared/data/imdb/", "imdb-classifier"),
        ("/data/Reviews 2024.csv.gz", "reviews-2024-classifier"),
        ("cardiffnlp/tweet_sentiment_multilingual", "tweet_sentiment_multilingual-classifier"),
    ],
)
def test_model_name_derives_from_the_data(data: str, name: str) -> None:
    assert FinetuneSpec(data=data).model_name() == name


def test_explicit_name_must_be_a_registry_name() -> None:
    with pytest.raises(ValidationError, match="lower-case letters"):
        FinetuneSpec(data="x.csv", name="My Model")


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="extra"):
        parse_spec({"data": "x.csv", "epoch": 3})


def test_label_names_need_two_distinct_names() -> None:
    with pytest.raises(ValidationError, match="at least two"):
        FinetuneSpec(data="x.csv", label_names=["positive"])
    with pytest.raises(ValidationError, match="different"):
        FinetuneSpec(data="x.csv", label_names=["a", "a"])


def test_every_field_is_documented() -> None:
    undocumented = [n for n, f in FinetuneSpec.model_fields.items() if not f.description]
    assert undocumented == ["kind"]


def test_int8_scoring_is_refused_for_a_gpu() -> None:
    fields = {"model": "m", "input": "in.csv", "output": "out.csv", "precision": "int8"}
    with pytest.raises(ValidationError, match="int8 scoring runs on a CPU: use precision bf16"):
        ScoreSpec(**fields, device="gpu")
    assert ScoreSpec(**fields, device="cpu").precision == "int8"
    assert ScoreSpec(**fields).device == "auto"  # routing sends int8 to the cpu queue
