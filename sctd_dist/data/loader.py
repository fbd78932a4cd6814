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
(each token's document inside its row, for attention within documents; `documents.py`); with
them `masked_positions` (int64 [n], flat indices of the labelled positions) and `padded` (a 0-dim
bool tensor: does any row hold [PAD]?). `padded` stays on the host (`HOST_KEYS`): the model
reads it to run attention without a mask on packed batches, without a device sync.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sctd_dist.documents import document_ids

from .dataset import PackedDataset
from .masking import IGNORE_INDEX, MaskingConfig, mask_rows, masked_positions
from .mixture import Blend
from .sampler import check_batch_sizes, step_positions

# Batch entries that stay on the host when a batch moves to its device.
HOST_KEYS = frozenset({"padded"})


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
        "masked_positions": torch.from_numpy(masked_positions(labels)),
        "padded": torch.tensor(bool((inputs == pad_id).any())),
        "document_ids": document_ids(input_ids, sep_id),
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
    """Training batches of one DP rank (see the module docstring and `sampler.py`).

    `dataset` is one prepared split, or several blended with `weights` (`mixture.py` decides
    which source and which row each sample is; `names` are the folders as given, the keys of
    `consumed_samples_by_source`)."""

    def __init__(
        self,
        dataset: PackedDataset | Sequence[PackedDataset],
        *,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        consumed_samples: int = 0,
        masking: MaskingConfig = MaskingConfig(),
        weights: Sequence[float] | None = None,
        names: Sequence[str] | None = None,
    ):
        self.grad_accum = check_batch_sizes(global_batch_size, micro_batch_size, dp_size)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.sources = [dataset] if isinstance(dataset, PackedDataset) else list(dataset)
        self.dataset = self.sources[0]
        self.names = list(names) if names is not None else [str(d.data_dir) for d in self.sources]
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.blend = Blend([len(d) for d in self.sources], weights or [1.0] * len(self.sources), seed,
                           global_batch_size)
        self.stream = self.blend.streams[0]
        self._maskers = [_Masker(d, s, masking) for d, s in zip(self.sources, self.blend.seeds)]
        self._mask = self._maskers[0]
        self.consumed_samples = int(consumed_samples)
        self._events: list[dict[str, Any]] = []

    @property
    def epoch(self) -> int:
        """The epoch the next step draws from (of the first source, for a blend)."""
        return self.blend.epochs(self.consumed_samples)[0]

    @property
    def steps_per_epoch(self) -> int:
        return self.stream.samples_per_epoch // self.global_batch_size

    @property
    def mixture(self) -> list[list[Any]]:
        """[[weight, folder as given], ...] (one folder: weight 1)."""
        return [[w, n] for w, n in zip(self.blend.weights, self.names)]

    @property
    def consumed_samples_by_source(self) -> dict[str, int]:
        """Samples each folder has given so far, keyed by the folder as given."""
        return {n: int(c) for n, c in zip(self.names, self.blend.consumed(self.consumed_samples))}

    def _positions(self, consumed_samples: int) -> np.ndarray:
        return step_positions(consumed_samples, global_batch_size=self.global_batch_size,
                              micro_batch_size=self.micro_batch_size, dp_rank=self.dp_rank,
                              dp_size=self.dp_size)

    def sample_indices_for_step(self, consumed_samples: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset rows, epochs) of this rank for the step at `consumed_samples`, each [accum, micro]
        (rows of the source `sources_for_step` names, for a blend)."""
        _, rows, epochs = self.blend.locate(self._positions(consumed_samples))
        return rows, epochs

    def sources_for_step(self, consumed_samples: int) -> np.ndarray:
        """The source index of each of this rank's samples of the step, [accum, micro]."""
        return self.blend.locate(self._positions(consumed_samples))[0]

    def batches_for_step(self, consumed_samples: int) -> list[dict[str, Any]]:
        """The `grad_accum` micro-batches of this rank for the step that starts at `consumed_samples`."""
        source, rows, epochs = (a.reshape(-1) for a in self.blend.locate(self._positions(consumed_samples)))
        inputs = np.empty((rows.size, self.dataset.seq_length), dtype=np.int64)
        labels = np.empty_like(inputs)
        for s in np.unique(source):
            sel = source == s
            tokens = self.sources[s].get_rows(rows[sel])
            inputs[sel], labels[sel] = self._maskers[s](tokens, epochs[sel], rows[sel])
        m = self.micro_batch_size
        pad, sep = self.dataset.special_ids.pad, self.dataset.special_ids.sep
        return [_to_batch(inputs[j * m:(j + 1) * m], labels[j * m:(j + 1) * m], pad, sep)
                for j in range(self.grad_accum)]

    def padded_share(self, steps: int) -> float:
        """Share of this rank's micro-batches over the next `steps` steps that hold a [PAD]
        (they run attention with a mask; the others without), read from the rows alone."""
        pad, m, padded, total = self.dataset.special_ids.pad, self.micro_batch_size, 0, 0
        for step in range(max(steps, 0)):
            positions = self._positions(self.consumed_samples + step * self.global_batch_size)
            source, rows, _ = (a.reshape(-1) for a in self.blend.locate(positions))
            has_pad = np.empty(rows.size, dtype=bool)
            for s in np.unique(source):
                sel = source == s
                has_pad[sel] = (self.sources[s].get_rows(rows[sel]) == pad).any(axis=1)
            per_micro = has_pad.reshape(-1, m).any(axis=1)
            padded, total = padded + int(per_micro.sum()), total + per_micro.size
        return padded / total if total else 0.0

    def __iter__(self) -> "PretrainingDataLoader":
        return self

    def __next__(self) -> list[dict[str, Any]]:
        batches = self.batches_for_step(self.consumed_samples)
        before = self.blend.epochs(self.consumed_samples)
        self.consumed_samples += self.global_batch_size
        after = self.blend.epochs(self.consumed_samples)
        self._events += [{"source": n, "epoch": e, "consumed_samples": self.consumed_samples}
                         for n, b, e in zip(self.names, before, after) if e != b]
        return batches

    def take_events(self) -> list[dict[str, Any]]:
        """The sources that started a new epoch since the last call (`data_epoch` events)."""
        events, self._events = self._events, []
        return events

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume at exactly the next sample."""
        state = {"consumed_samples": self.consumed_samples, "epoch": self.epoch, "seed": self.seed,
                 "global_batch_size": self.global_batch_size, "num_samples": len(self.dataset),
                 "data_path": _folder(self.dataset)}
        if self.blend.blended:
            state["mixture"] = {"weights": list(self.blend.weights), "folders": self._folders(),
                                "num_samples": list(self.blend.sizes), "start": self.blend.start,
                                "offsets": [int(o) for o in self.blend.offsets]}
        state["source_positions"] = dict(zip(self._folders(),
                                             map(int, self.blend.consumed(self.consumed_samples))))
        return state

    def _folders(self) -> list[str]:
        return [_folder(d) for d in self.sources]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()` output: set the position, nothing else. Whether the data,
        seed and batch may differ from the checkpoint's is decided, and said, once, by the resume
        plan (`RunRecord.compare`); the DP size and micro batch may differ. From other data (a
        new training phase) each folder of a new mixture that the old data held continues at its
        own position (`carry_source_positions`)."""
        same = self._same_data(state)
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed}")
        self.consumed_samples = consumed
        if same and self.blend.blended:
            self.blend.carry_over(state["mixture"]["start"], state["mixture"]["offsets"])
        elif not same:
            self.carry_source_positions(state)

    def _same_data(self, state: dict[str, Any]) -> bool:
        """Whether `state` was saved from this loader's folder or mixture (same weights)."""
        mixture = state.get("mixture")
        if not self.blend.blended:
            return mixture is None and state.get("data_path", _folder(self.dataset)) == _folder(self.dataset)
        return mixture is not None and mixture["folders"] == self._folders() and \
            np.allclose(mixture["weights"], self.blend.weights, rtol=0, atol=1e-12)

    def carry_source_positions(self, state: dict[str, Any]) -> None:
        """After a data switch to this mixture: each folder the saved data held continues at its
        saved position, the others start at their first sample, and the blend begins at this
        loader's `consumed_samples`. A single folder keeps the global position (as before)."""
        if not self.blend.blended:
            return
        saved = state.get("source_positions") or {state.get("data_path"): state.get("consumed_samples", 0)}
        self.blend.carry_over(self.consumed_samples, [int(saved.get(f, 0)) for f in self._folders()])


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
