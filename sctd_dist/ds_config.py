"""DeepSpeed JSON configs: load, fit to this run (batch sizes, schedule), check before any engine.

Every check here runs before `deepspeed.initialize`, so a bad config costs a second on the login
node instead of a queue slot and an engine bring-up:

- `load_ds_config` reads a file from `ds_configs/` (or anywhere) and rejects what DeepSpeed 0.19
  would reject or silently mishandle: invalid JSON, duplicate keys, Hugging Face "auto"
  placeholders and keys DeepSpeed has removed (see `REMOVED_KEYS`).
- `resolve_batch_sizes` makes the batch triple consistent for this data-parallel size.
- `apply_schedule` sizes the LR schedule from the run length; `apply_lr_schedule` puts the
  warmup-stable-decay schedule (`sctd_dist.lr_schedule`) in its place when the run asks for it.
- `precision`, `zero_stage`, `check_device_support` answer what the training loop needs to know.
- `validate_with_deepspeed` builds DeepSpeed's own config object (no process group needed) and
  checks the optimizer and scheduler parameters against the classes DeepSpeed will build.

Every function returns a new dict; the caller's config is never modified.
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import Any, Callable

import torch

from sctd_dist.lr_schedule import WSD, LRScheduleConfig
from sctd_dist.typed import finite, nonfinite_numbers

CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"

# Warmup when neither the caller nor the config names one: 1% of the run (BERT used 10k of 1M).
DEFAULT_WARMUP_FRACTION = 0.01

# Schedulers whose params hold the run length (`total_num_steps`) and a warmup length.
_DECAY_SCHEDULERS = ("WarmupDecayLR", "WarmupCosineLR")
_WARMUP_SCHEDULERS = _DECAY_SCHEDULERS + ("WarmupLR",)

# Keys DeepSpeed 0.19 removed. DeepSpeedConfig raises on any of them (deepspeed/runtime/config.py:
# `_REMOVED_TOP_LEVEL_CONFIG_KEYS`, `_REMOVED_ZERO_CONFIG_KEYS`, checked by
# `_reject_removed_config_keys`; tracking issue deepspeedai/DeepSpeed#8489). We keep our own copy
# so the check runs without importing DeepSpeed and says what to do instead in this project;
# tests/test_ds_config.py fails if a DeepSpeed upgrade adds keys missing here.
# Path (tuple of nested keys) -> what replaces it ("" = nothing: delete the block).
REMOVED_KEYS: dict[tuple[str, ...], str] = {
    ("amp",): 'NVIDIA Apex AMP integration was removed; use "bf16": {"enabled": true} '
              '(ds_configs/zero2_bf16.json) or an "fp16" block (ds_configs/zero2_fp16.json)',
    ("elasticity",): "elastic training was removed; set train_batch_size / "
                     "train_micro_batch_size_per_gpu (or --global-batch-size / --micro-batch-size); "
                     "our checkpoints already resume on a different number of GPUs",
    ("progressive_layer_drop",): "Progressive Layer Dropping was removed; token dropping is ours: "
                                 "--token-drop sctd|vanilla",
    ("sparse_attention",): "DeepSpeed Sparse Attention was removed; our attention uses "
                           "torch.nn.functional.scaled_dot_product_attention and needs no config",
    ("curriculum_learning",): "the legacy top-level block was removed; move it to "
                              "data_efficiency.data_sampling.curriculum_learning",
    ("nebula",): "Nebula checkpointing was removed; DeepSpeed's default checkpoint engine is used",
    ("compression_training",): "the DeepSpeed compression library was removed",
    ("quantize_training",): "Mixture-of-Quantization (MoQ) was removed",
    ("eigenvalue",): "eigenvalue-based MoQ was removed",
    ("sparse_gradients",): "sparse embedding-gradient compression was removed; embeddings built "
                           "with sparse=True are still reduced sparsely without a flag",
    ("graph_harvesting",): "graph harvesting was removed",
    ("zero_optimization", "mics_shard_size"): "MiCS sharding was removed; use plain ZeRO-3 "
                                              "(ds_configs/zero3_bf16.json) or ZeRO++ "
                                              "zero_hpz_partition_size",
    ("zero_optimization", "mics_hierarchical_params_gather"): "MiCS sharding was removed; use plain "
                                                              "ZeRO-3 or ZeRO++ zero_hpz_partition_size",
    ("zero_optimization", "zeropp_loco_param"): "LoCo-ZeRO++ was removed; standard ZeRO++ quantized "
                                                "gradients (zero_quantized_gradients) remain",
}


def _available_configs() -> list[str]:
    return sorted(p.name for p in CONFIG_DIR.glob("*.json"))


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of duplicate keys silently; DeepSpeed's own file loader refuses them.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _find_auto(node: Any, path: str = "") -> list[str]:
    """Paths of Hugging Face Trainer "auto" placeholders, which plain DeepSpeed cannot fill."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{path}.{k}" if path else k)]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _find_auto(v, f"{path}[{i}]")]
    return [path] if node == "auto" else []


def check_removed_keys(cfg: dict[str, Any], source: str = "the DeepSpeed config") -> None:
    """Raise ValueError naming every key DeepSpeed 0.19 removed, with its replacement."""
    found = []
    for path, replacement in REMOVED_KEYS.items():
        node: Any = cfg
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] in node:
            found.append(f'  - remove "{".".join(path)}": {replacement}')
    if found:
        raise ValueError(f"{source} holds keys DeepSpeed 0.19 no longer accepts:\n" + "\n".join(found))


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON config and reject what DeepSpeed 0.19 would refuse or mishandle.

    Raises ValueError when the file is missing (listing the files in ds_configs/), is not valid
    JSON (with line and column), repeats a key, is not a JSON object, holds "auto" placeholders
    or holds keys DeepSpeed removed (naming each and what replaces it).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--deepspeed_config {path} does not exist; pick one of ds_configs/...: "
                         f"{_available_configs()}")
    text = path.read_text(encoding="utf-8")
    try:
        cfg = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        # DeepSpeed itself parses hjson; we hold the presets to strict JSON (tools, jq, diffs).
        raise ValueError(f"--deepspeed_config {path} is not valid JSON: {e.msg} at line {e.lineno} "
                         f"column {e.colno} (no comments or trailing commas; notes go in a "
                         f"\"_comment\" key)") from None
    except ValueError as e:  # duplicate key
        raise ValueError(f"--deepspeed_config {path}: {e}; keep one") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"--deepspeed_config {path} must hold a JSON object, got {type(cfg).__name__}")
    check_removed_keys(cfg, f"--deepspeed_config {path}")
    auto = _find_auto(cfg)
    if auto:
        raise ValueError(f"--deepspeed_config {path} has \"auto\" values at {auto}: that placeholder is "
                         "filled by the Hugging Face Trainer only; write numbers (batch sizes come "
                         "from --micro-batch-size / --global-batch-size)")
    check_values(cfg, f"--deepspeed_config {path}")
    return cfg


# Numbers DeepSpeed passes on to torch unchecked: (key, lowest allowed, lowest excluded?).
_NUMBERS = (("gradient_clipping", 0.0, False), ("optimizer.params.lr", 0.0, True),
            ("optimizer.params.eps", 0.0, True), ("optimizer.params.weight_decay", 0.0, False))


def _at(cfg: dict[str, Any], key: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_values(cfg: dict[str, Any], source: str = "the DeepSpeed config") -> None:
    """Raise ValueError naming the key of the first value that cannot mean anything: a NaN or
    infinite number anywhere, a clipping norm, learning rate, eps or weight decay that is not a
    number or is negative, Adam betas that are not two numbers in [0, 1)."""
    bad = nonfinite_numbers(cfg)
    if bad:
        raise ValueError(f"{source}: {bad[0]} is not a finite number; write one")
    for key, low, strict in _NUMBERS:
        present, value = _at(cfg, key)
        if present and not (finite(value) and (value > low if strict else value >= low)):
            raise ValueError(f"{source}: {key} must be a number {'>' if strict else '>='} {low:g}, "
                             f"got {value!r}")
    present, betas = _at(cfg, "optimizer.params.betas")
    if present and not (isinstance(betas, list) and len(betas) == 2
                        and all(finite(b) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"{source}: optimizer.params.betas must be two numbers in [0, 1), got {betas!r}")


def _positive_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _quotient(total: int, part: int, message: Callable[[], str]) -> int:
    """total // part; ValueError(message()) unless `part` divides `total`."""
    if total % part:
        raise ValueError(message())
    return total // part


def resolve_batch_sizes(
    cfg: dict[str, Any],
    dp_size: int,
    *,
    micro_batch: int | None = None,
    global_batch: int | None = None,
) -> dict[str, Any]:
    """A copy whose train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps * dp_size.

    `micro_batch` / `global_batch` (the CLI flags) replace the config's values. When both sizes
    are known, gradient_accumulation_steps is derived from them; a value the config gives for it
    is kept only if no override was passed, and must then agree. When one size is missing it is
    derived with the config's accumulation steps (default 1). Raises ValueError naming the numbers
    when they cannot be made consistent for `dp_size`.
    """
    _positive_int(dp_size, "data-parallel size")
    out = copy.deepcopy(cfg)
    micro = _positive_int(micro_batch, "--micro-batch-size") or _positive_int(
        out.get("train_micro_batch_size_per_gpu"), "train_micro_batch_size_per_gpu")
    total = _positive_int(global_batch, "--global-batch-size") or _positive_int(
        out.get("train_batch_size"), "train_batch_size")
    accum = _positive_int(out.get("gradient_accumulation_steps"), "gradient_accumulation_steps")
    overridden = micro_batch is not None or global_batch is not None

    if micro is not None and total is not None:
        derived = _quotient(total, micro * dp_size, lambda: (
            f"global batch {total} is not a multiple of micro batch {micro} x data-parallel size "
            f"{dp_size} = {micro * dp_size}; choose a global batch that is (e.g. "
            f"{max(1, round(total / (micro * dp_size))) * micro * dp_size}) or another micro batch"))
        if accum is not None and not overridden and accum != derived:
            raise ValueError(
                f"train_batch_size {total} != train_micro_batch_size_per_gpu {micro} x "
                f"gradient_accumulation_steps {accum} x data-parallel size {dp_size} "
                f"(= {micro * accum * dp_size}); drop gradient_accumulation_steps from the config so "
                f"it follows the data-parallel size, or fix the numbers")
        accum = derived
    elif total is not None:  # micro batch derived
        accum = accum or 1
        micro = _quotient(total, accum * dp_size, lambda: (
            f"train_batch_size {total} is not a multiple of gradient_accumulation_steps {accum} x "
            f"data-parallel size {dp_size} = {accum * dp_size}; set train_micro_batch_size_per_gpu "
            f"or --micro-batch-size"))
    elif micro is not None:  # global batch derived
        accum = accum or 1
        total = micro * accum * dp_size
    else:
        raise ValueError("the DeepSpeed config sets neither train_batch_size nor "
                         "train_micro_batch_size_per_gpu; set one or pass --global-batch-size / "
                         "--micro-batch-size")
    out.update(train_batch_size=total, train_micro_batch_size_per_gpu=micro,
               gradient_accumulation_steps=accum)
    return out


def apply_schedule(
    cfg: dict[str, Any], train_iters: int, warmup: int | float | None = None
) -> dict[str, Any]:
    """A copy whose LR schedule spans `train_iters` optimizer steps.

    For WarmupDecayLR / WarmupCosineLR, `total_num_steps` becomes `train_iters` (always: the run
    length is the CLI's). Warmup, first match wins: `warmup` (an int is steps, a float in (0, 1) a
    fraction of `train_iters`); the config's own `warmup_num_steps` when it sets one; else
    DEFAULT_WARMUP_FRACTION of the run. At least 1 step (DeepSpeed requires a positive count).
    Other schedulers, or none, are left as they are. Raises ValueError when the warmup does not
    fit inside a decaying schedule.
    """
    _positive_int(train_iters, "--train-iters")
    out = copy.deepcopy(cfg)
    sched = out.get("scheduler")
    if not isinstance(sched, dict) or sched.get("type") not in _WARMUP_SCHEDULERS:
        return out
    params = sched.setdefault("params", {})
    if warmup is not None:
        if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or warmup < 0:
            raise ValueError(f"warmup must be a step count or a fraction in (0, 1), got {warmup!r}")
        if isinstance(warmup, float):
            if not 0 <= warmup < 1:
                raise ValueError(f"a warmup fraction must lie in [0, 1), got {warmup}")
            steps = round(warmup * train_iters)
        else:
            steps = warmup
    elif "warmup_num_steps" in params:
        steps = _positive_int(params["warmup_num_steps"], "scheduler.params.warmup_num_steps")
    else:
        steps = round(DEFAULT_WARMUP_FRACTION * train_iters)
    steps = max(1, int(steps))
    if sched["type"] in _DECAY_SCHEDULERS:
        if steps >= train_iters and train_iters > 1:
            raise ValueError(
                f"warmup of {steps} steps does not fit in --train-iters {train_iters}: the learning "
                "rate would never decay; lower scheduler.params.warmup_num_steps (or remove it to "
                f"warm up for {DEFAULT_WARMUP_FRACTION:.0%} of the run) or train longer")
        params["total_num_steps"] = train_iters
    params["warmup_num_steps"] = steps
    return out


def apply_lr_schedule(cfg: dict[str, Any], schedule: LRScheduleConfig, train_iters: int,
                      decay_iters: int | None = None) -> tuple[dict[str, Any], WSD | None]:
    """A copy of `cfg` with the run's LR schedule in place, and the WSD schedule when the run
    uses one (`--lr-schedule wsd`: the JSON's scheduler block is dropped, the engine gets a
    `WSDScheduler`; its peak is optimizer.params.lr, its default warmup the JSON's
    warmup_num_steps). Otherwise `apply_schedule` sizes the JSON's own scheduler."""
    if schedule.lr_schedule != "wsd":
        return apply_schedule(cfg, decay_iters or train_iters), None
    out = copy.deepcopy(cfg)
    present, peak = _at(out, "optimizer.params.lr")
    if not present or not finite(peak):
        raise ValueError("--lr-schedule wsd takes its peak from optimizer.params.lr: set it in the "
                         "DeepSpeed JSON or pass --lr")
    sched = out.pop("scheduler", None)
    warmup = ((sched or {}).get("params") or {}).get("warmup_num_steps") if isinstance(sched, dict) else None
    json_warmup = warmup if isinstance(warmup, int) and not isinstance(warmup, bool) and warmup > 0 else None
    return out, schedule.resolve(train_iters, float(peak), json_warmup)


def precision(cfg: dict[str, Any]) -> torch.dtype:
    """The dtype DeepSpeed gives the model's parameters: float16, bfloat16 or float32."""
    fp16 = bool((cfg.get("fp16") or {}).get("enabled", False))
    # DeepSpeed also reads the older spelling "bfloat16" when "bf16" is absent.
    bf16_block = cfg.get("bf16", cfg.get("bfloat16")) or {}
    bf16 = bool(bf16_block.get("enabled", False))
    if fp16 and bf16:
        raise ValueError("the DeepSpeed config enables both fp16 and bf16; enable one")
    return torch.float16 if fp16 else torch.bfloat16 if bf16 else torch.float32


def zero_stage(cfg: dict[str, Any]) -> int:
    """The ZeRO stage (0 when the config has no zero_optimization block)."""
    stage = (cfg.get("zero_optimization") or {}).get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= 3:
        raise ValueError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return stage


def check_device_support(cfg: dict[str, Any], device_type: str) -> None:
    """Raise ValueError when the config's precision cannot run on `device_type` ("cpu", "cuda")."""
    dtype = precision(cfg)
    if dtype == torch.float16 and device_type == "cpu":
        raise ValueError("fp16 needs a GPU on DeepSpeed; use ds_configs/zero1_bf16.json or a fp32 "
                         "config on CPU")
    if dtype == torch.bfloat16 and device_type == "cuda" and torch.cuda.is_available():
        # Pre-Ampere GPUs only emulate bf16 (slowly); DeepSpeed would run, just badly.
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            raise ValueError(f"bf16 needs an Ampere or newer GPU ({torch.cuda.get_device_name()} "
                             "has none); use ds_configs/zero2_fp16.json")


def _check_signature(fn: Any, params: dict[str, Any], what: str, skip: int = 1) -> None:
    """Raise ValueError when `params` would not bind as keyword arguments of `fn`."""
    sig = inspect.signature(fn)
    names = list(sig.parameters)[skip:]  # after self / the optimizer or model parameters
    if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise ValueError(f"{what}: unknown key(s) {unknown}; accepted: {names}")
    try:
        sig.bind(*([None] * skip), **params)
    except TypeError as e:
        raise ValueError(f"{what}: {e}; accepted: {names}") from None


def _check_optimizer_and_scheduler(cfg: dict[str, Any]) -> None:
    """What DeepSpeedConfig does not check: the kwargs the engine will pass to the classes it builds."""
    opt = cfg.get("optimizer")
    if isinstance(opt, dict) and isinstance(opt.get("type"), str):
        params = dict(opt.get("params") or {})
        if "max_grad_norm" in params:
            raise ValueError("optimizer.params.max_grad_norm is refused by DeepSpeed; use the "
                             "top-level \"gradient_clipping\"")
        name = opt["type"].lower()
        # Mirrors DeepSpeed's engine: these keys are consumed by DeepSpeed, not the optimizer.
        for key in ("torch_adam", "adam_w_mode", "fp32_optimizer_states"):
            params.pop(key, None)
        if name in ("adam", "adamw") and (opt.get("params") or {}).get("torch_adam"):
            _check_signature(torch.optim.AdamW, params, "optimizer.params")
        elif name not in ("adam", "adamw", "adagrad", "lamb", "lion", "muadam", "muadamw", "musgd",
                          "muon") and not hasattr(torch.optim, opt["type"]):
            raise ValueError(f"optimizer.type {opt['type']!r} is neither a DeepSpeed optimizer nor "
                             "in torch.optim")
    sched = cfg.get("scheduler")
    if isinstance(sched, dict) and isinstance(sched.get("type"), str):
        from deepspeed.runtime import lr_schedules

        cls = getattr(lr_schedules, sched["type"], None) or getattr(torch.optim.lr_scheduler,
                                                                    sched["type"], None)
        if cls is None:
            raise ValueError(f"scheduler.type {sched['type']!r} is neither a DeepSpeed LR schedule "
                             "(WarmupDecayLR, WarmupCosineLR, WarmupLR, OneCycle, LRRangeTest) nor "
                             "in torch.optim.lr_scheduler")
        _check_signature(cls.__init__, dict(sched.get("params") or {}), "scheduler.params", skip=2)


def validate_with_deepspeed(cfg: dict[str, Any], dp_size: int = 1) -> Any:
    """Build DeepSpeed's own `DeepSpeedConfig` for `dp_size` data-parallel ranks; return it.

    Needs no process group: DeepSpeedConfig falls back to world size 1 without one (and would use
    the whole world, TP ranks included, with one), so the data-parallel size is set explicitly
    before DeepSpeed checks the batch triple. Also checks optimizer and scheduler params against
    the classes the engine will build. Raises ValueError with DeepSpeed's message.
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    _positive_int(dp_size, "data-parallel size")
    check_removed_keys(cfg)

    class _DataParallelConfig(DeepSpeedConfig):
        def _configure_train_batch_size(self) -> None:
            self.world_size = dp_size
            super()._configure_train_batch_size()

    try:
        ds = _DataParallelConfig(copy.deepcopy(cfg))
    except Exception as e:  # DeepSpeedConfigError, AssertionError, pydantic errors, ...
        msg = str(e).strip() or type(e).__name__
        raise ValueError(f"DeepSpeed rejects this config (data-parallel size {dp_size}): {msg}") from e
    _check_optimizer_and_scheduler(cfg)
    return ds
