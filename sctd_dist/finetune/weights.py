"""The pretrained weights a fine-tuning run starts from, and the proof that all of them loaded.

`--model` is a Hugging Face folder (what `sctd_dist.export` writes) or one of our checkpoint
folders (a `--save` folder or one `global_stepN` in it), which is exported on the fly. The task
model (`transformers.AutoModelForSequenceClassification` / `AutoModelForQuestionAnswering`: BERT
or ModernBERT, as the folder's config.json says) is then
checked against the checkpoint file itself: every encoder tensor of the model must come from a
checkpoint tensor of the same name with the same value, and every checkpoint tensor must be used
except the pretraining heads (`cls.*`; ModernBERT's `decoder.*`, and `head.*` where the task model has none). A renamed or missing weight would otherwise be silently
initialised at random and every task would score about the majority class.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

_SHOWN = 6  # names listed in an error line before "+N more"


@dataclass
class ModelSource:
    """Where the weights came from (recorded in the results)."""

    folder: Path  # the Hugging Face folder actually loaded
    given: Path  # what --model said
    checkpoint: dict[str, Any] = field(default_factory=dict)  # tag and step when exported on the fly

    def to_dict(self) -> dict[str, Any]:
        return {"model": str(self.given), **self.checkpoint}


def _is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def _checkpoint_location(path: Path, tag: str | None) -> tuple[Path, str | None] | None:
    """(checkpoint folder, tag) when `path` is a --save folder or one tag folder in it."""
    from sctd_dist import checkpoint

    if (path / checkpoint.LATEST).is_file() or any(path.glob(f"*/{checkpoint.RUN_FILE}")):
        return path, tag
    if (path / checkpoint.RUN_FILE).is_file():
        if tag not in (None, path.name):
            raise ValueError(f"--model {path} is the checkpoint {path.name}; --tag {tag} names another")
        return path.parent, path.name
    return None


def check_model(path: Path, tag: str | None = None) -> None:
    """Raise ValueError when `--model` (with `--tag`) is neither a Hugging Face folder nor a
    checkpoint folder: cheap, so that it runs before any data is read."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"--model {path} does not exist")
    if _is_hf_folder(path):
        if tag is not None:
            raise ValueError(f"--tag is for checkpoint folders; --model {path} is a Hugging Face folder")
        return
    if _checkpoint_location(path, tag) is None:
        raise ValueError(f"--model {path} is neither a Hugging Face folder (config.json) nor an sctd-dist "
                         "checkpoint folder (a --save folder with 'latest', or a global_stepN folder)")


@contextlib.contextmanager
def resolve_model(path: Path, tag: str | None = None, work_dir: Path | None = None) -> Iterator[ModelSource]:
    """The Hugging Face folder of `--model`, exported into a temporary folder (under `work_dir`)
    for the duration of the block when `path` is a checkpoint."""
    path = Path(path)
    check_model(path, tag)
    if _is_hf_folder(path):
        yield ModelSource(path, path)
        return
    location = _checkpoint_location(path, tag)
    assert location is not None  # check_model
    from sctd_dist import checkpoint
    from sctd_dist.export import export

    ckpt_dir, ckpt_tag = location
    ckpt_tag = ckpt_tag or checkpoint.latest_tag(ckpt_dir)
    if ckpt_tag is None:
        raise ValueError(f"--model {path}: no complete checkpoint (no 'latest' pointer); pass --tag")
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="exported-", dir=work_dir) as tmp:
        folder = export(ckpt_dir, Path(tmp) / "model", ckpt_tag)
        run = json.loads((folder / checkpoint.RUN_FILE).read_text())
        yield ModelSource(folder, path, {"checkpoint": str(ckpt_dir), "tag": ckpt_tag, "step": run.get("step")})


def checkpoint_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor stored in a Hugging Face folder (safetensors or .bin, sharded or not)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        files = (sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
                 if index.is_file() else [folder / single] if (folder / single).is_file() else [])
        if files:
            state: dict[str, torch.Tensor] = {}
            for f in files:
                state.update(load_file(f) if f.suffix == ".safetensors"
                             else torch.load(f, map_location="cpu", weights_only=True))
            return state
    raise ValueError(f"--model {folder} has no model.safetensors or pytorch_model.bin")


def _names(keys: list[str]) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


# Pretraining-only weights of the masked-LM checkpoints: BERT's MLM head, ModernBERT's decoder
# and prediction head (a ModernBERT task model that has a `head` loads it; unused it is no loss).
_PRETRAINING_ONLY = ("cls.", "decoder.", "head.")


def _as_model_key(key: str, model_keys: set[str], prefix: str = "bert.") -> str:
    """A checkpoint key under the name transformers loads it as: a bare encoder's keys gain the
    task model's base prefix (`bert.`, ModernBERT's `model.`); legacy LayerNorm `gamma`/`beta`
    become `weight`/`bias`."""
    candidates = [key, f"{prefix}{key}"]
    for old, new in ((".gamma", ".weight"), (".beta", ".bias")):
        if key.endswith(old):
            renamed = key[: -len(old)] + new
            candidates += [renamed, f"{prefix}{renamed}"]
    return next((c for c in candidates if c in model_keys), key)


def _buffer_names(model: torch.nn.Module) -> set[str]:
    """Every buffer, persistent or not: older exports store `position_ids` / `token_type_ids`,
    which transformers now rebuilds instead of loading."""
    return {name for name, _ in model.named_buffers()}


def _not_for_this_head(key: str, model: torch.nn.Module) -> bool:
    """Checkpoint tensors a task model has no place for by design: the pretraining heads (BERT's
    `cls.*`, ModernBERT's decoder and prediction head), non-persistent buffers, and the pooler
    under a head that does not pool (question answering)."""
    if key.startswith(_PRETRAINING_ONLY) or key in _buffer_names(model):
        return True
    base = getattr(model, model.base_model_prefix, None)
    return key.startswith(f"{model.base_model_prefix}.pooler.") and getattr(base, "pooler", None) is None


def verify_loaded(model: torch.nn.Module, stored: Mapping[str, torch.Tensor], given: Path) -> list[str]:
    """Raise ValueError naming every encoder weight that did not load from `stored`; returns the
    names the model initialised afresh (task head, and the pooler when the checkpoint has none)."""
    state = model.state_dict()
    model_keys = set(state)
    prefix = f"{model.base_model_prefix}."
    ckpt = {_as_model_key(k, model_keys | _buffer_names(model), prefix): v for k, v in stored.items()}
    pooler = f"{prefix}pooler."
    has_pooler = any(k.startswith(pooler) for k in ckpt)
    encoder = [k for k in state if k.startswith(prefix) and (has_pooler or not k.startswith(pooler))]
    missing = [k for k in encoder if k not in ckpt]
    unused = [k for k in ckpt if k not in model_keys and not _not_for_this_head(k, model)]
    differ = [k for k in encoder if k in ckpt and (tuple(ckpt[k].shape) != tuple(state[k].shape)
                                                   or not torch.equal(ckpt[k].to(state[k].dtype), state[k]))]
    problems = []
    if missing:
        problems.append(f"encoder weight(s) not in the checkpoint: {_names(missing)}")
    if unused:
        problems.append(f"checkpoint weight(s) the model does not use (renamed?): {_names(unused)}")
    if differ:
        problems.append(f"weight(s) that did not load as stored (shape or value): {_names(differ)}")
    if problems:
        raise ValueError(f"--model {given}: {'; '.join(problems)}. Fine-tuning would start them from random "
                         "values: fix the weight names in the checkpoint (or export it again)")
    return sorted(k for k in state if k not in ckpt)


def load_task_model(source: ModelSource, kind: str, num_labels: int,
                    copy_segment_b: bool = False) -> tuple[torch.nn.Module, list[str]]:
    """The transformers task model on the pretrained weights (fp32), verified; returns it and
    the names of the freshly initialised weights. `copy_segment_b` then starts token type 1 from
    token type 0 (see segments.py)."""
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the load report is ours (verify_loaded), not a warning table
    hf_logging.disable_progress_bar()
    # Auto classes: the folder's config.json decides BERT or ModernBERT.
    if kind == "qa":
        model = AutoModelForQuestionAnswering.from_pretrained(source.folder, dtype=torch.float32)
    else:
        problem = "regression" if kind == "regression" else "single_label_classification"
        model = AutoModelForSequenceClassification.from_pretrained(
            source.folder, num_labels=num_labels, problem_type=problem, dtype=torch.float32)
    fresh = verify_loaded(model, checkpoint_state_dict(source.folder), source.given)
    if copy_segment_b:
        from sctd_dist.finetune.segments import copy_segment_a

        copy_segment_a(model)
    return model, fresh


def model_tokenizer(source: ModelSource, tokenizer_dir: Path | None, vocab_size: int):
    """The model's fast tokenizer (from `tokenizer_dir`, else the model folder), checked."""
    from sctd_dist.data.tokenizer import load_pretrained_tokenizer

    where = Path(tokenizer_dir) if tokenizer_dir else source.folder
    flag = "--tokenizer" if tokenizer_dir else "--model"
    if not ((where / "tokenizer.json").is_file() or (where / "vocab.txt").is_file()):
        raise ValueError(f"{flag} {tokenizer_dir or source.given} has no tokenizer (tokenizer.json or vocab.txt); "
                         "pass --tokenizer DIR")
    try:
        tok = load_pretrained_tokenizer(where, local_only=True)
    except FileNotFoundError as exc:
        raise ValueError(f"{flag}: {exc}") from None
    if len(tok) > vocab_size:
        raise ValueError(f"{flag} {where}: the tokenizer has {len(tok)} ids but the model's vocab_size is "
                         f"{vocab_size}; this tokenizer does not belong to this model")
    return tok
