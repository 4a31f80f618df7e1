"""A value model: an HF backbone plus a linear head giving one scalar per token (reward models and critics).

The layout is that of transformers' `XForSequenceClassification` with `num_labels=1`: the backbone lives under
`model` and the head is `score` (Linear(hidden, 1, bias=False)). A directory written by `save_hf` therefore loads
with plain `AutoModelForSequenceClassification.from_pretrained(dir)`, whose logits are the value at the last
non-pad token, i.e. the reward.

    values = value_model(input_ids, attention_mask)          # (batch, seq_len) float32, one value per token
    rewards = last_token_values(values, attention_mask)      # (batch,) value at each row's last real token

Head initialisation follows ColossalChat (coati RewardModel / Critic): N(0, std = 1 / (hidden_size + 1)).
ColossalChat's head also has a bias; this one does not, so that the HF sequence-classification class loads it.
"""

from __future__ import annotations

import torch
from torch import nn


def value_head_init_std(hidden_size: int) -> float:
    """ColossalChat's value-head init: std = 1 / (hidden_size + 1)."""
    return 1.0 / (hidden_size + 1)


class ValueHeadModel(nn.Module):
    """Backbone (`model`) + scalar head (`score`), state-dict compatible with XForSequenceClassification."""

    def __init__(self, backbone: nn.Module, score: nn.Linear, config) -> None:
        super().__init__()
        if score.out_features != 1:
            raise ValueError(f"value head must have one output (got {score.out_features}); build it with num_labels=1")
        self.model = backbone
        self.score = score
        #: the HF config of the sequence-classification class (architectures, num_labels=1, pad_token_id)
        self.config = config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """input_ids, attention_mask: (batch, seq_len). Returns values (batch, seq_len) in float32."""
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        hidden = outputs.last_hidden_state                        # (batch, seq_len, hidden)
        return self.score(hidden).squeeze(-1).float()             # (batch, seq_len)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.model.gradient_checkpointing_enable(**kwargs)


def last_token_values(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The value at each row's last attended position.

    values: (batch, seq_len); attention_mask: (batch, seq_len) of 0/1, left or right padded.
    Returns (batch,). The last 1 in each mask row is found with argmax over a position-weighted mask, so both
    padding sides work (HF's sequence classifier assumes right padding and looks for the first pad token).
    """
    positions = torch.arange(values.shape[-1], device=values.device)
    last = (attention_mask.to(positions.dtype) * (positions + 1)).argmax(dim=-1)   # (batch,)
    return values.gather(-1, last.unsqueeze(-1)).squeeze(-1)


def init_value_head(score: nn.Linear, hidden_size: int, generator: torch.Generator | None = None) -> None:
    """Re-initialise a freshly created head the ColossalChat way (weights only; the head has no bias)."""
    with torch.no_grad():
        score.weight.normal_(mean=0.0, std=value_head_init_std(hidden_size), generator=generator)
        if score.bias is not None:
            score.bias.zero_()
