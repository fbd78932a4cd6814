"""What the encoder configs of every architecture share: the TP and sequence-length checks, the
padded vocabulary, and reading a --model-config JSON of overrides."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class EncoderConfigMixin:
    """Methods over the fields every encoder config has (`vocab_size`, `hidden_size`,
    `num_attention_heads`, `intermediate_size`, `max_position_embeddings`,
    `make_vocab_size_divisible_by`)."""

    def check_tensor_parallel(self, tp_size: int) -> None:
        """Raise ValueError when the model cannot be split over `tp_size` ranks."""
        if self.num_attention_heads % tp_size:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"--tensor-model-parallel-size {tp_size}; use a TP size dividing the head count"
            )
        if self.intermediate_size % tp_size:
            raise ValueError(
                f"intermediate_size {self.intermediate_size} is not divisible by TP size {tp_size}"
            )

    def check_seq_length(self, seq_length: int) -> None:
        """Raise ValueError when sequences do not fit the positions the model was made for."""
        if seq_length > self.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq_length} exceeds max_position_embeddings "
                f"{self.max_position_embeddings}; shorten --seq-length or raise "
                "max_position_embeddings in --model-config"
            )

    def padded_vocab_size(self, tp_size: int = 1) -> int:
        """Vocabulary rounded up so every TP shard has the same, GEMM-friendly width."""
        multiple = self.make_vocab_size_divisible_by * tp_size
        return -(-self.vocab_size // multiple) * multiple

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def read_overrides(overrides: dict[str, Any] | str | Path | None, config_name: str) -> dict[str, Any]:
    """--model-config overrides as a dict: given as one, or read from a JSON file of
    `config_name` fields (ValueError naming the file when it is unreadable or not an object)."""
    if not isinstance(overrides, (str, Path)):
        return dict(overrides or {})
    path = overrides
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--model-config {path} is unreadable: {exc}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--model-config {path} must hold a JSON object of {config_name} fields")
    return values
