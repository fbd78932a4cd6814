"""The ids of the five special tokens BERT pretraining needs.

Its own module because both sides use it: the data pipeline reads the ids from a tokenizer and
masks around them, the model pins them in the token-importance table. Neither imports the other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

ROLES = ("cls", "sep", "mask", "pad", "unk")


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of [CLS], [SEP], [MASK], [PAD] and [UNK]."""

    cls: int
    sep: int
    mask: int
    pad: int
    unk: int

    @property
    def all(self) -> tuple[int, ...]:
        """All five ids, sorted: never masked, never drawn as random replacements."""
        return tuple(sorted({self.cls, self.sep, self.mask, self.pad, self.unk}))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> "SpecialTokenIds":
        return cls(**{k: int(d[k]) for k in ROLES})
