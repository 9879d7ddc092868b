"""The last encoder layer of a BERT-family classifier computed for the first token only.

Why: a sequence classifier of the BERT family reads one position of its last layer's output,
the first token's (``[CLS]``, ``<s>``): BERT's pooler takes ``hidden_states[:, 0]``, and
RoBERTa's, XLM-R's and ELECTRA's classification heads ``features[:, 0, :]``. Every other
position of the last layer is computed and then dropped: its query, its row of attention, the
output projection, both LayerNorms and the feed-forward network, in the forward pass and again
in the backward. In MiniLM (6 layers) that is 14 % of a step's arithmetic, in bert-base (12
layers) 7 %.

What: where a model's head reads only the first token, its last layer computes the keys and
values of every token (the first token attends to all of them) and everything else for the
first token alone. The logits, the loss and every gradient are the whole layer's to within
float rounding (the tests compare them); the random draws of that layer's dropout differ, as
they do between two runs. The layer's output then has one position, so the layer computes all
of them whenever a call asks for hidden states or attentions, and for models whose layer,
attention or head is not BERT's, compared instruction by instruction.

``TUNEQ_FIRST_TOKEN_ONLY=false`` computes the whole last layer.
"""

from __future__ import annotations

import logging
import types
from functools import cache
from typing import Any

import torch

from tuneq.schemas.settings import load_settings
from tuneq.worker.ml import cpu_attention
from tuneq.worker.ml.models import forward_signature

log = logging.getLogger(__name__)

# Sequence classifiers whose head reads the last layer's first position and nothing else.
FIRST_TOKEN_HEADS = frozenset(
    {
        "BertForSequenceClassification",
        "RobertaForSequenceClassification",
        "XLMRobertaForSequenceClassification",
        "CamembertForSequenceClassification",
        "ElectraForSequenceClassification",
    }
)
# Attention implementations whose masks are ``(batch, 1, queries or 1, keys)`` tensors or None.
MASKED_ATTENTION = ("sdpa", "eager", cpu_attention.NAME)
ASKS_FOR_ALL_POSITIONS = ("output_hidden_states", "output_attentions")


@cache
def bert_forwards() -> dict[str, tuple[Any, ...]]:
    """The instructions, names and constants of the BERT layer parts whose work the first-token
    forward does."""
    from transformers.models.bert import modeling_bert as bert

    parts = {
        "layer": bert.BertLayer,
        "attention": bert.BertAttention,
        "self": bert.BertSelfAttention,
    }
    return {name: forward_signature(part) for name, part in parts.items()}


def is_bert(module: Any, part: str) -> bool:
    return module is not None and forward_signature(type(module)) == bert_forwards()[part]


def last_layer(model: Any) -> Any | None:
    """The last encoder layer of a BERT-family classifier whose head reads the first token,
    where that layer is BERT's; None for any other model."""
    config = model.config
    if (
        type(model).__name__ not in FIRST_TOKEN_HEADS
        or getattr(config, "is_decoder", False)
        or getattr(config, "add_cross_attention", False)
        or getattr(config, "position_embedding_type", "absolute") != "absolute"
        or getattr(config, "_attn_implementation", None) not in MASKED_ATTENTION
    ):
        return None
    layers = getattr(getattr(model.base_model, "encoder", None), "layer", None)
    if not layers:
        return None
    layer = layers[-1]
    attention = getattr(layer, "attention", None)
    if not (
        is_bert(layer, "layer")
        and is_bert(attention, "attention")
        and is_bert(getattr(attention, "self", None), "self")
    ):
        return None
    return layer


def first_token_forward(
    self: Any,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    cache: Any = None,
    **kwargs: Any,
) -> torch.Tensor:
    """BERT's layer forward for the first position only, while the model's call reads nothing
    else (see :func:`use_for`); the layer's own forward otherwise."""
    checkpointed = self.training and getattr(self, "gradient_checkpointing", False)
    if (
        not self.first_token_only
        or checkpointed  # its recomputation would run after the call, on the whole layer
        or encoder_hidden_states is not None
        or cache is not None
    ):
        return type(self).forward(
            self,
            hidden_states,
            attention_mask,
            encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            cache=cache,
            **kwargs,
        )
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.bert.modeling_bert import eager_attention_forward
    from transformers.pytorch_utils import apply_chunking_to_forward

    attention = self.attention.self
    batch, size = hidden_states.shape[0], attention.attention_head_size
    first = hidden_states[:, :1]
    query = attention.query(first).view(batch, 1, -1, size).transpose(1, 2)
    key = attention.key(hidden_states).view(batch, -1, attention.num_attention_heads, size)
    value = attention.value(hidden_states).view(key.shape)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :1]  # the first query's row (or the one row)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(
        attention.config._attn_implementation, eager_attention_forward
    )
    context, _ = attend(
        attention,
        query,
        key.transpose(1, 2),
        value.transpose(1, 2),
        attention_mask,
        dropout=attention.dropout.p if attention.training else 0.0,
        scaling=attention.scaling,
        **kwargs,
    )
    attended = self.attention.output(context.reshape(batch, 1, -1).contiguous(), first)
    return apply_chunking_to_forward(
        self.feed_forward_chunk, self.chunk_size_feed_forward, self.seq_len_dim, attended
    )


def use_for(model: Any) -> bool:
    """Give a first-token classifier's last layer the first-token forward (see the module's
    docstring); returns whether it did. Each call of the model switches it on unless the call
    asks for hidden states or attentions, and off again when the call returns."""
    if not load_settings().first_token_only:
        return False
    layer = last_layer(model)
    if layer is None:
        return False
    layer.first_token_only = False
    layer.forward = types.MethodType(first_token_forward, layer)
    model.register_forward_pre_hook(first_token_on, with_kwargs=True)
    model.register_forward_hook(first_token_off, with_kwargs=True, always_call=True)
    log.info("the last layer of %s computes the first token only", type(model).__name__)
    return True


def in_use(model: Any) -> bool:
    """Whether ``model``'s last layer has the first-token forward."""
    layer = last_layer(model)
    forward = vars(layer).get("forward") if layer is not None else None
    return getattr(forward, "__func__", None) is first_token_forward


def first_token_on(model: Any, args: Any, kwargs: dict[str, Any]) -> None:
    """Before each call of the model: the first token only, unless the call asks for every
    position's hidden states or attentions. (The hooks find the layer from the model they are
    called on, so that a deep copy of the model switches its own layer.)"""
    config = model.config
    asks = any(kwargs.get(k) or getattr(config, k, False) for k in ASKS_FOR_ALL_POSITIONS)
    model.base_model.encoder.layer[-1].first_token_only = not asks


def first_token_off(model: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
    model.base_model.encoder.layer[-1].first_token_only = False
