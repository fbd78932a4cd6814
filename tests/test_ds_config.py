"""DeepSpeed configs: every file in ds_configs/ is accepted by DeepSpeed itself and trains.

The static checks run in-process and take well under a second each. The training cases build a
real DeepSpeed engine on our tiny ScTD BERT in spawned gloo ranks (DP=2, so ZeRO really
partitions): one spawn, shared by all cases and xdist workers, builds a fresh model and engine
per config, ZeRO-3 last (see TRAIN_CASES).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sctd_dist.ds_config import (
    CONFIG_DIR,
    REMOVED_KEYS,
    apply_schedule,
    check_device_support,
    load_ds_config,
    precision,
    resolve_batch_sizes,
    validate_with_deepspeed,
    zero_stage,
)

CONFIGS = sorted(CONFIG_DIR.glob("*.json"))


def _is_fp16(path: Path) -> bool:
    try:
        return precision(json.loads(path.read_text())) == torch.float16
    except (ValueError, AttributeError):
        return False  # a broken file fails its own tests below


# fp16 is GPU-only on DeepSpeed: every other file is trained on CPU below.
CPU_CAPABLE = [p for p in CONFIGS if not _is_fp16(p)]


def test_the_presets_exist():
    names = {p.name for p in CONFIGS}
    assert {"zero0_fp32.json", "zero1_bf16.json", "zero2_bf16.json", "zero3_bf16.json",
            "zero2_fp16.json", "cpu_tiny.json"} <= names
    assert "zero2_fp16.json" not in {p.name for p in CPU_CAPABLE}


# ---- every file, through DeepSpeed's own config object -------------------------------------

@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_deepspeed_accepts_the_file(path: Path):
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads(path.read_text())
    DeepSpeedConfig(raw)  # the file exactly as written, as plain `deepspeed` would read it
    cfg = load_ds_config(path)
    for dp in (1, 2):
        fitted = apply_schedule(resolve_batch_sizes(cfg, dp), train_iters=1000)
        ds = validate_with_deepspeed(fitted, dp)
        assert ds.world_size == dp
        assert ds.train_batch_size == ds.train_micro_batch_size_per_gpu * ds.gradient_accumulation_steps * dp
        assert ds.zero_optimization_stage == zero_stage(cfg)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_file_follows_project_policy(path: Path):
    """Settings every preset shares (see the brief in SPEC 3): a new file must opt in explicitly."""
    cfg = load_ds_config(path)
    opt = cfg["optimizer"]
    assert opt["type"] == "AdamW"
    assert opt["params"]["torch_adam"] is True  # DeepSpeed's CPU Adam would JIT-compile for a minute
    assert opt["params"]["betas"] == [0.9, 0.98] and opt["params"]["eps"] == 1e-6
    assert opt["params"]["weight_decay"] == 0.01
    assert cfg["scheduler"]["type"] == "WarmupDecayLR"
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["steps_per_print"] >= 100_000 and cfg["wall_clock_breakdown"] is False
    # The accumulation steps follow the DP size, so the file must not pin them.
    assert "gradient_accumulation_steps" not in cfg
    if precision(cfg) == torch.float16:
        fp16 = cfg["fp16"]
        assert fp16["loss_scale"] == 0 and fp16["min_loss_scale"] >= 1 and fp16["hysteresis"] >= 2


def test_removed_key_table_covers_deepspeed():
    """A DeepSpeed upgrade that removes more keys must be mirrored in REMOVED_KEYS."""
    import deepspeed.runtime.config as ds_config_module

    top = getattr(ds_config_module, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {})
    zero = getattr(ds_config_module, "_REMOVED_ZERO_CONFIG_KEYS", {})
    ours = set(REMOVED_KEYS)
    assert {(k,) for k in top} <= ours
    assert {("zero_optimization", k) for k in zero} <= ours


# ---- load_ds_config ---------------------------------------------------------------------------

def _write(tmp_path: Path, cfg: dict | str) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return path


def _minimal() -> dict:
    return json.loads((CONFIG_DIR / "cpu_tiny.json").read_text())


def test_removed_keys_are_named_with_their_replacement(tmp_path):
    cfg = _minimal()
    cfg["amp"] = {"enabled": True, "opt_level": "O1"}
    cfg["progressive_layer_drop"] = {"enabled": True, "theta": 0.5, "gamma": 0.001}
    cfg["zero_optimization"]["mics_shard_size"] = 8
    with pytest.raises(ValueError) as err:
        load_ds_config(_write(tmp_path, cfg))
    msg = str(err.value)
    assert 'remove "amp"' in msg and '"bf16"' in msg
    assert 'remove "progressive_layer_drop"' in msg and "--token-drop" in msg
    assert 'remove "zero_optimization.mics_shard_size"' in msg
    # ... and a dict built in code is caught the same way before DeepSpeed sees it.
    with pytest.raises(ValueError, match='remove "amp"'):
        validate_with_deepspeed({**_minimal(), "amp": {}})


@pytest.mark.parametrize("path", sorted(REMOVED_KEYS), ids=".".join)
def test_every_removed_key_is_refused(tmp_path, path):
    cfg = _minimal()
    node = cfg
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = {}
    with pytest.raises(ValueError, match=f'remove "{".".join(path)}"'):
        load_ds_config(_write(tmp_path, cfg))


def test_missing_file_lists_the_presets(tmp_path):
    with pytest.raises(ValueError) as err:
        load_ds_config(tmp_path / "nope.json")
    msg = str(err.value)
    assert "--deepspeed_config" in msg and "does not exist" in msg
    assert "cpu_tiny.json" in msg and "zero2_bf16.json" in msg


def test_bad_json_reports_line_and_column(tmp_path):
    path = _write(tmp_path, '{\n  "train_batch_size": 8,\n  "bf16": {"enabled": true,}\n}\n')
    with pytest.raises(ValueError, match=r"not valid JSON: .* line 3 column \d+"):
        load_ds_config(path)


def test_duplicate_keys_and_non_objects_are_refused(tmp_path):
    with pytest.raises(ValueError, match="duplicate key 'train_batch_size'"):
        load_ds_config(_write(tmp_path, '{"train_batch_size": 8, "train_batch_size": 16}'))
    with pytest.raises(ValueError, match="JSON object"):
        load_ds_config(_write(tmp_path, "[1, 2]"))


def test_hf_auto_placeholders_are_refused(tmp_path):
    cfg = _minimal()
    cfg["train_micro_batch_size_per_gpu"] = "auto"
    cfg["optimizer"]["params"]["lr"] = "auto"
    with pytest.raises(ValueError, match=r"\"auto\" values at \['train_micro_batch_size_per_gpu', "
                                         r"'optimizer.params.lr'\]"):
        load_ds_config(_write(tmp_path, cfg))


# ---- resolve_batch_sizes ----------------------------------------------------------------------

def _triple(cfg: dict) -> tuple[int, int, int]:
    return (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"],
            cfg["gradient_accumulation_steps"])


@pytest.mark.parametrize(
    "given, dp, micro, global_, expected",
    [
        # (train_batch_size, micro, grad_accum) in the file -> resolved (global, micro, accum)
        ((256, 32, None), 8, None, None, (256, 32, 1)),
        ((256, 32, None), 2, None, None, (256, 32, 4)),
        ((256, 32, None), 2, 16, None, (256, 16, 8)),       # --micro-batch-size wins
        ((256, 32, None), 2, None, 512, (512, 32, 8)),      # --global-batch-size wins
        ((256, 32, 4), 2, 8, 64, (64, 8, 4)),               # both win; accum re-derived
        ((256, 32, 8), 1, None, None, (256, 32, 8)),        # a consistent full triple is kept
        ((256, None, 2), 4, None, None, (256, 32, 2)),      # micro derived with the file's accum
        ((None, 4, 3), 2, None, None, (24, 4, 3)),          # global derived
        ((None, 4, None), 2, None, None, (8, 4, 1)),
        ((64, None, None), 4, None, None, (64, 16, 1)),
    ],
)
def test_batch_resolution(given, dp, micro, global_, expected):
    cfg = {k: v for k, v in zip(("train_batch_size", "train_micro_batch_size_per_gpu",
                                 "gradient_accumulation_steps"), given) if v is not None}
    before = dict(cfg)
    out = resolve_batch_sizes(cfg, dp, micro_batch=micro, global_batch=global_)
    assert _triple(out) == expected
    assert cfg == before  # the caller's dict is untouched
    validate_with_deepspeed(out, dp)  # and DeepSpeed agrees


@pytest.mark.parametrize(
    "given, dp, micro, global_, match",
    [
        ((256, 32, None), 16, None, None, r"global batch 256 is not a multiple of micro batch 32 x "
                                          r"data-parallel size 16 = 512"),
        ((256, 32, None), 3, None, None, r"micro batch 32 x data-parallel size 3 = 96"),
        ((256, 32, 4), 4, None, None, r"train_batch_size 256 != .* 32 x gradient_accumulation_steps "
                                      r"4 x data-parallel size 4 \(= 512\)"),
        ((100, None, 3), 2, None, None, r"train_batch_size 100 is not a multiple of "
                                        r"gradient_accumulation_steps 3 x data-parallel size 2"),
        ((None, None, 2), 2, None, None, r"neither train_batch_size nor"),
        ((256, 32, None), 2, 0, None, r"--micro-batch-size must be a positive integer, got 0"),
        ((256, 32, None), 0, None, None, r"data-parallel size must be a positive integer"),
    ],
)
def test_batch_resolution_errors(given, dp, micro, global_, match):
    cfg = {k: v for k, v in zip(("train_batch_size", "train_micro_batch_size_per_gpu",
                                 "gradient_accumulation_steps"), given) if v is not None}
    with pytest.raises(ValueError, match=match):
        resolve_batch_sizes(cfg, dp, micro_batch=micro, global_batch=global_)


# ---- apply_schedule ---------------------------------------------------------------------------

def _sched(cfg: dict) -> dict:
    return cfg["scheduler"]["params"]


def test_schedule_follows_the_run_length():
    cfg = _minimal()
    out = apply_schedule(cfg, 20_000)
    assert _sched(out)["total_num_steps"] == 20_000
    assert _sched(out)["warmup_num_steps"] == 200  # DEFAULT_WARMUP_FRACTION
    assert "warmup_num_steps" not in _sched(cfg)  # input untouched
    assert _sched(apply_schedule(cfg, 3))["warmup_num_steps"] == 1  # at least one step
    assert _sched(apply_schedule(cfg, 1000, warmup=0.1))["warmup_num_steps"] == 100
    assert _sched(apply_schedule(cfg, 1000, warmup=25))["warmup_num_steps"] == 25


def test_schedule_keeps_an_explicit_warmup():
    cfg = _minimal()
    _sched(cfg)["warmup_num_steps"] = 500
    out = apply_schedule(cfg, 10_000)
    assert _sched(out)["warmup_num_steps"] == 500
    assert _sched(out)["total_num_steps"] == 10_000
    assert _sched(apply_schedule(cfg, 10_000, warmup=7))["warmup_num_steps"] == 7  # caller wins
    with pytest.raises(ValueError, match="warmup of 500 steps does not fit in --train-iters 100"):
        apply_schedule(cfg, 100)


def test_schedule_errors_and_other_schedulers():
    cfg = _minimal()
    for bad in (1.5, -1, True):
        with pytest.raises(ValueError, match="warmup"):
            apply_schedule(cfg, 100, warmup=bad)
    with pytest.raises(ValueError, match="--train-iters"):
        apply_schedule(cfg, 0)
    no_sched = {k: v for k, v in cfg.items() if k != "scheduler"}
    assert apply_schedule(no_sched, 100) == no_sched
    warmup_only = {**cfg, "scheduler": {"type": "WarmupLR", "params": {}}}
    assert _sched(apply_schedule(warmup_only, 100)) == {"warmup_num_steps": 1}


def test_scheduler_and_optimizer_params_are_checked_before_the_engine():
    cfg = resolve_batch_sizes(_minimal(), 1)
    typo = json.loads(json.dumps(cfg))
    _sched(typo)["warmup_steps"] = 10
    with pytest.raises(ValueError, match=r"scheduler.params: unknown key\(s\) \['warmup_steps'\]"):
        validate_with_deepspeed(typo)
    missing = json.loads(json.dumps(cfg))
    del _sched(missing)["total_num_steps"]
    with pytest.raises(ValueError, match="total_num_steps"):
        validate_with_deepspeed(missing)
    clip = json.loads(json.dumps(cfg))
    clip["optimizer"]["params"]["max_grad_norm"] = 1.0
    with pytest.raises(ValueError, match="gradient_clipping"):
        validate_with_deepspeed(clip)
    bad_opt = json.loads(json.dumps(cfg))
    bad_opt["optimizer"]["params"]["beta1"] = 0.9
    with pytest.raises(ValueError, match=r"optimizer.params: unknown key\(s\) \['beta1'\]"):
        validate_with_deepspeed(bad_opt)
    zero = json.loads(json.dumps(cfg))
    zero["zero_optimization"]["stage3_prefetch_bucket"] = 1
    with pytest.raises(ValueError, match="(?s)DeepSpeed rejects this config.*stage3_prefetch_bucket"):
        validate_with_deepspeed(zero)


# ---- precision / stage / device -----------------------------------------------------------------

def test_precision_and_stage_of_the_presets():
    expected = {"zero0_fp32.json": (torch.float32, 0), "zero1_bf16.json": (torch.bfloat16, 1),
                "zero2_bf16.json": (torch.bfloat16, 2), "zero3_bf16.json": (torch.bfloat16, 3),
                "zero2_fp16.json": (torch.float16, 2), "cpu_tiny.json": (torch.float32, 1)}
    for name, (dtype, stage) in expected.items():
        cfg = load_ds_config(CONFIG_DIR / name)
        assert (precision(cfg), zero_stage(cfg)) == (dtype, stage), name
    assert precision({"bfloat16": {"enabled": True}}) == torch.bfloat16  # DeepSpeed's old spelling
    assert zero_stage({}) == 0
    with pytest.raises(ValueError, match="both fp16 and bf16"):
        precision({"fp16": {"enabled": True}, "bf16": {"enabled": True}})
    with pytest.raises(ValueError, match="stage must be 0, 1, 2 or 3"):
        zero_stage({"zero_optimization": {"stage": 4}})


def test_fp16_on_cpu_is_refused():
    cfg = load_ds_config(CONFIG_DIR / "zero2_fp16.json")
    with pytest.raises(ValueError, match=r"fp16 needs a GPU on DeepSpeed; use "
                                         r"ds_configs/zero1_bf16.json or a fp32 config on CPU"):
        check_device_support(cfg, "cpu")
    for name in ("zero1_bf16.json", "cpu_tiny.json", "zero0_fp32.json"):
        check_device_support(load_ds_config(CONFIG_DIR / name), "cpu")


def test_bf16_on_a_pre_ampere_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    with pytest.raises(ValueError, match="Ampere.*zero2_fp16.json"):
        check_device_support(load_ds_config(CONFIG_DIR / "zero2_bf16.json"), "cuda")
    check_device_support(load_ds_config(CONFIG_DIR / "zero2_fp16.json"), "cuda")


# ---- real engines: 3 optimizer steps per CPU-capable config -------------------------------------

TRAIN_ITERS = 3
SEQ = 32
VOCAB = 300


def _random_batch(gen: torch.Generator, micro: int, device: torch.device) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, VOCAB, (micro, SEQ), generator=gen)
    ids[:, 0] = 2  # [CLS]
    masked = torch.rand(micro, SEQ, generator=gen) < 0.15
    masked[:, 0] = False
    masked[:, 1] = True  # every sequence has a target
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    inputs = torch.where(masked, torch.full_like(ids, 4), ids)  # [MASK]
    return {"input_ids": inputs.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": labels.to(device)}


def _master_weights(engine) -> list[torch.Tensor]:
    """Every parameter's fp32 master copy, whole (gathered from the ZeRO partitions).

    Under bf16 a small first update can vanish in the bf16 copy (LayerNorm weights sit at 1.0,
    where a bf16 step is 2**-7), so the optimizer's fp32 weights are the ones to compare.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    out = []
    for p in engine.module.parameters():
        full = safe_get_full_fp32_param(p)  # collective under ZeRO-3: every rank calls it
        out.append((p if full is None else full).detach().float().clone())  # None: plain fp32
    return out


def _train_one(rank: int, ctx, name: str, micro: int, global_batch: int) -> dict:
    """Three optimizer steps of the tiny ScTD model under ds_configs/`name`, as train.py does it."""
    import deepspeed

    from sctd_dist.model.config import BertModelConfig, TokenDropConfig
    from sctd_dist.model.pretraining import PretrainingModel
    from sctd_dist.parallel import MegatronMPU
    from sctd_dist.special_tokens import SpecialTokenIds

    ds = load_ds_config(CONFIG_DIR / name)
    check_device_support(ds, ctx.device.type)
    ds = resolve_batch_sizes(ds, ctx.dp_size, micro_batch=micro, global_batch=global_batch)
    ds = apply_schedule(ds, TRAIN_ITERS)
    validate_with_deepspeed(ds, ctx.dp_size)

    torch.manual_seed(0)  # the same initial weights on every rank
    cfg = BertModelConfig.from_preset("tiny", vocab_size=VOCAB, max_position_embeddings=64)
    model = PretrainingModel(cfg, TokenDropConfig(mode="sctd"),
                             SpecialTokenIds(cls=2, sep=3, mask=4, unk=1, pad=0), ctx)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds, mpu=MegatronMPU())
    model.micro_batches_per_step = engine.gradient_accumulation_steps()
    before = _master_weights(engine)
    importance_before = model.importance.scores.detach().clone()
    gen = torch.Generator().manual_seed(1000 + rank)  # each DP rank sees its own data
    losses = []
    for _ in range(TRAIN_ITERS):
        for _ in range(engine.gradient_accumulation_steps()):
            out = engine(_random_batch(gen, micro, engine.device), step=engine.global_steps)
            engine.backward(out.loss)
            engine.step()
            losses.append(out.loss.detach().item())
    after = _master_weights(engine)
    return {
        "losses": losses,
        "changed": sum(not torch.equal(a, b) for a, b in zip(before, after)) / len(before),
        "param_dtype": next(engine.module.parameters()).dtype,
        "engine_stage": engine.zero_optimization_stage(),
        "global_steps": engine.global_steps,
        "accum": engine.gradient_accumulation_steps(),
        "scheduler": (type(scheduler).__name__, scheduler.total_num_steps),
        "lr": engine.get_lr()[0],
        "importance_moved": not torch.equal(importance_before, model.importance.scores),
        "weights": torch.cat([a.flatten() for a in after]),
        "ds": ds,
    }


def _train_rank(rank: int, world_size: int, cases: list[tuple[str, int, int]]) -> dict[str, dict]:
    """Run every case on this rank; a failing config reports its traceback instead of a result."""
    import traceback

    from sctd_dist.parallel import initialize

    ctx = initialize(1)
    results = {}
    for name, micro, global_batch in cases:
        try:
            results[name] = _train_one(rank, ctx, name, micro, global_batch)
        except Exception:  # keep going: the test reports every failing config at once
            results[name] = {"error": traceback.format_exc()}
    return results


# (micro batch, global batch) at DP=2: fp32 cases also accumulate 2 micro-batches; bf16 (~20x slower
# on these CPUs) does one micro-batch of 2 per step.
TRAIN_BATCH = {"zero0_fp32.json": (2, 8), "cpu_tiny.json": (2, 8)}


def _stage_of(path: Path) -> int:
    try:
        return zero_stage(json.loads(path.read_text()))
    except (ValueError, AttributeError):
        return 0  # a broken file fails its own tests above; here it only needs an order


# A spawn of 2 ranks costs ~20-30 s on 2 cores (megatron-core import, DeepSpeed's shm op), an
# engine here ~1 s: so one spawn trains every config, each with a fresh model and engine, and
# ZeRO-3 (which hooks into the modules it partitions) goes last so nothing it leaves behind can
# reach another case.
TRAIN_CASES = [(p.name, *TRAIN_BATCH.get(p.name, (2, 4)))
               for p in sorted(CPU_CAPABLE, key=lambda p: (_stage_of(p) == 3, p.name))]


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> list[dict[str, dict]]:
    """Per-rank results of the one training spawn, computed once per test session.

    Under pytest-xdist the workers share the session's base temp folder: the first to get here
    trains and stores the results, the others wait on the lock and read them.
    """
    import os
    import traceback

    from filelock import FileLock  # a dependency of torch itself

    from tests.distributed import run_ranks

    def train() -> dict:
        try:
            return {"results": run_ranks(_train_rank, 2, TRAIN_CASES)}
        except Exception:  # stored, so other workers report it instead of training again
            return {"error": traceback.format_exc()}

    if "PYTEST_XDIST_WORKER" not in os.environ:
        data = train()
    else:
        store = tmp_path_factory.getbasetemp().parent / "ds_config_training.pt"
        with FileLock(f"{store}.lock"):
            if not store.exists():
                torch.save(train(), store)
        data = torch.load(store, weights_only=False)
    if "error" in data:
        pytest.fail(f"the training spawn failed:\n{data['error']}")
    return data["results"]


@pytest.mark.parametrize("path", CPU_CAPABLE, ids=lambda p: p.name)
def test_config_trains_three_steps_with_a_real_engine(trained, path: Path):
    name, micro, global_batch = next(c for c in TRAIN_CASES if c[0] == path.name)
    per_rank = [r[name] for r in trained]
    for rank, r in enumerate(per_rank):
        if "error" in r:
            pytest.fail(f"{name} on rank {rank}:\n{r['error']}")
    for rank, r in enumerate(per_rank):
        where = f"{name}, rank {rank}"
        ds = r["ds"]
        assert all(math.isfinite(x) for x in r["losses"]), (where, r["losses"])
        assert r["global_steps"] == TRAIN_ITERS, where
        assert r["accum"] == global_batch // (micro * 2) == ds["gradient_accumulation_steps"], where
        assert r["engine_stage"] == zero_stage(ds), where
        assert r["param_dtype"] == precision(ds), where
        assert r["scheduler"] == ("WarmupDecayLR", TRAIN_ITERS), where
        # warmup_max_lr null: the schedule peaks at the optimizer's lr, so --lr moves both.
        assert 0 < r["lr"] <= ds["optimizer"]["params"]["lr"], (where, r["lr"])
        assert r["changed"] > 0.9, f"{where}: only {r['changed']:.0%} of the parameters moved"
        assert r["importance_moved"], where
    # Data parallelism is real: the ranks saw different data, yet hold the same weights.
    assert per_rank[0]["losses"] != per_rank[1]["losses"], name
    assert torch.equal(per_rank[0]["weights"], per_rank[1]["weights"]), name
