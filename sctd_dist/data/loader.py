"""Batches for training and validation: positioned in O(1), masked at load time.

`PretrainingDataLoader` is its own iterator: each `next()` returns the micro-batches of this
data-parallel rank for one optimizer step and advances `consumed_samples` by the global batch.
It is the run's one record of the data position: its state is `consumed_samples` (the epoch
follows from it), a checkpoint stores `state_dict()` and a restart calls `load_state_dict()` --
no replay of earlier batches. No background prefetch: loading and masking a step costs well
under 1% of a training step (benchmarks/results/data_pipeline.json).

Every micro-batch is a dict of int64 torch tensors of shape [micro, seq_length]:
`input_ids` (masked), `attention_mask` (1 real token, 0 [PAD]), `token_type_ids` (zeros, no
NSP), `labels` (the original id where a token is predicted, -100 elsewhere) and `document_ids`
(each token's document inside its row, for attention within documents; `documents.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .dataset import PackedDataset
from .documents import document_ids
from .masking import IGNORE_INDEX, MaskingConfig, mask_rows
from .sampler import SampleStream, check_batch_sizes, step_positions


def _word_start_table(dataset: PackedDataset, masking: MaskingConfig) -> np.ndarray | None:
    if not masking.whole_word_masking:
        return None
    from tokenizers import Tokenizer

    from .tokenizer import word_start_table

    backend = Tokenizer.from_file(str(dataset.tokenizer_dir / "tokenizer.json"))
    table = word_start_table(backend)
    if table.size < dataset.vocab_size:
        table = np.concatenate([table, np.ones(dataset.vocab_size - table.size, dtype=bool)])
    return table


def _to_batch(inputs: np.ndarray, labels: np.ndarray, pad_id: int, sep_id: int) -> dict[str, Any]:
    import torch

    input_ids = torch.from_numpy(np.ascontiguousarray(inputs))
    return {
        "input_ids": input_ids,
        "attention_mask": torch.from_numpy((inputs != pad_id).astype(np.int64)),
        "token_type_ids": torch.zeros_like(input_ids),
        "labels": torch.from_numpy(np.ascontiguousarray(labels)),
        "document_ids": torch.from_numpy(document_ids(inputs, sep_id)),
    }


class _Masker:
    """Binds a dataset's special ids and vocabulary to the masking function."""

    def __init__(self, dataset: PackedDataset, seed: int, masking: MaskingConfig):
        self.dataset = dataset
        self.seed = seed
        self.masking = masking
        self.specials = dataset.special_ids
        self.word_starts = _word_start_table(dataset, masking)

    def __call__(self, rows: np.ndarray, epochs: np.ndarray, sample_indices: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
        return mask_rows(rows, seed=self.seed, epochs=epochs, sample_indices=sample_indices,
                         special_ids=self.specials.all, mask_id=self.specials.mask,
                         vocab_size=self.dataset.vocab_size, config=self.masking,
                         word_start_table=self.word_starts)


class PretrainingDataLoader:
    """Training batches of one DP rank (see the module docstring and `sampler.py`)."""

    def __init__(
        self,
        dataset: PackedDataset,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        consumed_samples: int = 0,
        masking: MaskingConfig = MaskingConfig(),
    ):
        self.grad_accum = check_batch_sizes(global_batch_size, micro_batch_size, dp_size)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.stream = SampleStream(len(dataset), global_batch_size, seed)
        self._mask = _Masker(dataset, seed, masking)
        self.consumed_samples = int(consumed_samples)

    @property
    def epoch(self) -> int:
        """The epoch the next step draws from."""
        return self.stream.epoch_of(self.consumed_samples)

    @property
    def steps_per_epoch(self) -> int:
        return self.stream.samples_per_epoch // self.global_batch_size

    def sample_indices_for_step(self, consumed_samples: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset rows, epochs) of this rank for the step at `consumed_samples`, each [accum, micro]."""
        positions = step_positions(consumed_samples, global_batch_size=self.global_batch_size,
                                   micro_batch_size=self.micro_batch_size, dp_rank=self.dp_rank,
                                   dp_size=self.dp_size)
        return self.stream.rows(positions)

    def batches_for_step(self, consumed_samples: int) -> list[dict[str, Any]]:
        """The `grad_accum` micro-batches of this rank for the step that starts at `consumed_samples`."""
        rows, epochs = self.sample_indices_for_step(consumed_samples)
        tokens = self.dataset.get_rows(rows.reshape(-1))
        inputs, labels = self._mask(tokens, epochs.reshape(-1), rows.reshape(-1))
        m = self.micro_batch_size
        pad, sep = self.dataset.special_ids.pad, self.dataset.special_ids.sep
        return [_to_batch(inputs[j * m:(j + 1) * m], labels[j * m:(j + 1) * m], pad, sep)
                for j in range(self.grad_accum)]

    def __iter__(self) -> "PretrainingDataLoader":
        return self

    def __next__(self) -> list[dict[str, Any]]:
        batches = self.batches_for_step(self.consumed_samples)
        self.consumed_samples += self.global_batch_size
        return batches

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume at exactly the next sample."""
        return {"consumed_samples": self.consumed_samples, "epoch": self.epoch, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "num_samples": len(self.dataset),
                "data_path": _folder(self.dataset)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()` output: set the position, nothing else. Whether the data,
        seed and batch may differ from the checkpoint's is decided, and said, once, by the resume
        plan (`RunRecord.compare`); the DP size and micro batch may differ."""
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed}")
        self.consumed_samples = consumed


def _folder(dataset: PackedDataset) -> str:
    return str(Path(dataset.data_dir).resolve())


class ValidationDataLoader:
    """One deterministic pass over a split (no shuffle, masks fixed per row), sharded over DP ranks.

    Every rank yields the same number of micro-batches (collectives stay matched); slots past the
    end are filled with "[CLS] [SEP] [PAD]..." rows whose labels are all -100, so they add
    nothing to the loss and have no fully masked attention row.
    """

    def __init__(self, dataset: PackedDataset, *, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, masking: MaskingConfig = MaskingConfig(), max_samples: int | None = None):
        check_batch_sizes(micro_batch_size * dp_size, micro_batch_size, dp_size)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.num_samples = len(dataset) if max_samples is None else min(len(dataset), max_samples)
        if self.num_samples < 1:
            raise ValueError(f"the {dataset.split} split of {dataset.data_dir} is empty; prepare with a "
                             "larger --validation-fraction")
        self._mask = _Masker(dataset, seed, masking)

    def __len__(self) -> int:
        per_pass = self.micro_batch_size * self.dp_size
        return -(-self.num_samples // per_pass)

    def sample_indices(self, step: int) -> np.ndarray:
        """Rows of this rank's micro-batch `step`; -1 marks filler slots."""
        start = step * self.micro_batch_size * self.dp_size + self.dp_rank * self.micro_batch_size
        idx = start + np.arange(self.micro_batch_size, dtype=np.int64)
        return np.where(idx < self.num_samples, idx, -1)

    def batch(self, step: int) -> dict[str, Any]:
        idx = self.sample_indices(step)
        real = idx >= 0
        specials = self.dataset.special_ids
        tokens = np.full((idx.size, self.dataset.seq_length), specials.pad, dtype=np.int64)
        tokens[:, 0], tokens[:, 1] = specials.cls, specials.sep
        labels = np.full_like(tokens, IGNORE_INDEX)
        inputs = tokens.copy()
        if real.any():
            rows = self.dataset.get_rows(idx[real])
            inputs[real], labels[real] = self._mask(rows, np.zeros(int(real.sum()), np.int64), idx[real])
        return _to_batch(inputs, labels, specials.pad, specials.sep)
