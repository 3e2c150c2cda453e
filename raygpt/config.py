"""One config object: a dataclass tree loaded from YAML, overridable with `--set section.key=value`.

Loading goes raw YAML -> `--set` overrides -> unknown-key check -> model preset -> typed
dataclasses -> cross-field validation. Every problem is a `UserError` with one line naming the
bad key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raygpt.errors import UserError
from raygpt.model import PRESETS, GPTConfig

SCHEMA_VERSION = 1
FAULT_KINDS = ("raise", "kill", "sigterm")
EVAL_MODES = ("spread", "first")
PRECISIONS = ("auto", "fp32", "bf16")  # train.precision (raygpt.training.speed resolves auto)
MAX_VOCABULARY = 1 << 20  # far past any uint16 token id; a larger table is a typo, not a model
STRATEGIES = ("ddp", "fsdp")  # run.strategy (raygpt.training.sharding)
PARAMETRIZATIONS = ("standard", "mup")  # model.parametrization (raygpt.model)
EVAL_TASKS = ("hellaswag", "multiple_choice")  # train.evals tasks (raygpt.multiple_choice)
EVAL_KEYS = ("task", "data", "every", "limit", "name")
LOGGERS = ("tensorboard", "mlflow", "wandb")  # run.loggers (raygpt.training.trackers)
WANDB_MODES = ("online", "offline", "disabled")  # run.wandb_mode
# run.accelerator_type: Ray's accelerator types (ray.util.accelerators) and one such GPU's memory in
# GB, for the memory plan (raygpt.training.memory).
GPU_MEMORY_GB = {
    "A10G": 24, "L4": 24, "T4": 16, "V100": 16, "L40S": 48, "A100-40G": 40, "A100-80G": 80,
    "H100": 80, "H200": 141, "B200": 180,
}


@dataclass
class ModelConfig(GPTConfig):
    # A name from raygpt.model.PRESETS; keys set beside it override the preset's values.
    preset: str | None = None
    # A local Hugging Face GPT-2 folder (config.json + model.safetensors or pytorch_model.bin)
    # whose weights a new run starts from; its shape must be this section's (raygpt.hf).
    init_from: str | None = None
    # Keep only each block's input for backward and recompute the rest (less memory, ~1/3 more
    # compute); the loss curve is the same.
    activation_checkpointing: bool = False


@dataclass
class DataConfig:
    dir: str = "data/stdlib"  # written by `raygpt prepare`: a folder (local or NFS) or a URI (s3://, gs://)
    source: str | None = None  # "stdlib": `raygpt train` prepares `dir` from it when missing
    stride: int | None = None  # window stride; None means context_len (non-overlapping, as the recipe's data loader)


@dataclass
class OptimConfig:
    # Defaults are the recipe's: AdamW(weight_decay=0.1), warmup from initial_lr to peak_lr, cosine to min_lr.
    peak_lr: float = 0.01
    initial_lr: float = 0.0001
    min_lr: float = 1e-6
    warmup_steps: int = 15
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_norm: float = 1.0
    clip_during_warmup: bool = False  # the recipe clips only once warmup is over
    decay_matrices_only: bool = False  # the recipe decays every parameter
    fused: bool | None = None  # fused AdamW kernel; null: on GPUs and CPUs (raygpt.training.speed)


@dataclass
class TrainConfig:
    batch_size: int = 2  # global sequences per optimizer step
    num_epochs: int = 15
    max_steps: int | None = None
    max_tokens: int | None = None
    grad_accum_steps: int = 1
    eval_freq: int = 5
    # Every this many steps, a light row in the metrics log (and TensorBoard): the step's train loss
    # (mean over workers and micro-batches), gradient norm, lr, step time, tokens/s.
    log_freq: int = 1
    # Evaluation (raygpt.training.evaluation.evaluate). spread: fixed windows spread evenly over each whole split,
    # eval_tokens per split per report (ceil(eval_tokens / context_len) windows, at most the split);
    # the last report's val loss reads final_eval_tokens (at least eval_tokens; null: the whole val
    # split). first: the original recipe's first eval_iter micro-batches of each split, in order.
    # Defaults measured on the default corpus: README "Evaluation".
    eval_mode: str = "spread"
    eval_tokens: int = 65536
    final_eval_tokens: int | None = 262144
    eval_iter: int = 1  # eval_mode first only
    save_freq: int = 50
    seed: int = 123
    start_context: str = "Every effort moves you"
    # Speed (raygpt.training.speed). precision: auto (bf16 on GPUs that have it, else fp32) | fp32 | bf16.
    precision: str = "auto"
    tf32: bool = True  # fp32 matmuls on tensor cores (GPUs only)
    compile: bool = False  # torch.compile the model (a compile pause at start, faster steps after)
    # Multiple-choice evals during training (raygpt.multiple_choice), each
    # {task: hellaswag | multiple_choice, data: jsonl path or URI, every: steps (a multiple of
    # eval_freq), limit: first N items (null: all), name: metric prefix (default: the task)}:
    # scored at step 0, every `every` steps and at the end, split over the workers, logged as
    # <name>_acc and <name>_acc_norm (a search can rank on them: tune.metric, tune.mode max).
    evals: list[dict] = field(default_factory=list)


@dataclass
class RunConfig:
    name: str | None = None  # None: a unique name per run
    storage_path: str = "runs"  # shared checkpoint storage: a folder or a pyarrow URI (s3://, gs://)
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # when use_gpu; each worker trains on one device either way
    max_failures: int = 0  # worker-group restarts Ray Train may make from the latest checkpoint
    num_to_keep: int = 2  # checkpoints kept, best by val_loss (the latest is always kept too)
    resource_wait_s: float = 60.0  # how long to wait for workers' resources (an autoscaler adding nodes)
    peak_tflops: float | None = None  # one device's peak for MFU; null: GPU table or a CPU probe
    # The GPU the run is sized for (Ray's accelerator type: A10G, L4, A100-80G, H100, ...): the memory
    # plan is checked against its memory before launch. null: not checked.
    accelerator_type: str | None = None
    # ddp: every worker holds the whole model, its gradients and AdamW state; fsdp: FSDP2 shards
    # all three over the workers (each transformer block and the root), for models that do not fit.
    strategy: str = "ddp"
    # Checkpoints written and stored on a background thread: the loop blocks only while the state
    # is copied to host memory (raygpt.training.saver). Off in search trials (ASHA may stop a trial
    # right after the report that saved).
    async_save: bool = False
    # Where rank 0 logs the run's curves besides metrics.jsonl, the same values in each
    # (raygpt.training.trackers): tensorboard (event files in the run folder), mlflow, wandb; [] for
    # none. mlflow and wandb need their packages (pip install 'raygpt[mlflow]' / 'raygpt[wandb]').
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])
    # Settings left null are read from the launching shell at launch and saved with the run, so every
    # worker and every resume logs to the same place:
    # MLflow's tracking store; null: $MLFLOW_TRACKING_URI, else sqlite:///<storage_path>/mlflow.db
    mlflow_tracking_uri: str | None = None
    wandb_project: str | None = None  # null: $WANDB_PROJECT, else raygpt
    wandb_mode: str | None = None  # online | offline | disabled; null: $WANDB_MODE, else W&B's own (online)


@dataclass
class FaultConfig:
    """Fault injection, off by default: one worker fails once at a step, to watch recovery."""

    crash_at_step: int | None = None  # after this optimizer step; null: off
    kind: str = "raise"  # raise: an exception; kill: SIGKILL; sigterm: SIGTERM (a spot preemption)
    rank: int = 0  # the worker that fails


@dataclass
class Config:
    schema_version: int = SCHEMA_VERSION
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# section name -> its dataclass, e.g. "model" -> ModelConfig
SECTIONS: dict[str, type] = {
    name: hint for name, hint in typing.get_type_hints(Config).items() if name != "schema_version"
}


def _valid_keys(section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(SECTIONS[section])]


@dataclass
class _Override:
    """A `--set` value: its text, read as YAML for typed keys and kept verbatim for strings
    (so `--set train.start_context=a: b` is the text, not a mapping)."""

    text: str

    def resolve(self, hint: Any) -> Any:
        try:
            parsed = yaml.safe_load(self.text) if self.text.strip() else self.text
        except yaml.YAMLError:
            parsed = self.text
        wants_str = hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                                    and str in typing.get_args(hint))
        if wants_str and parsed is not None:
            return self.text
        return parsed


def _parse_override(item: str) -> tuple[str, str, _Override]:
    key, sep, value = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise UserError(f"--set {item!r}: expected section.key=value, e.g. --set train.batch_size=8")
    return section, name, _Override(value)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings to a raw config dict. A known key's value is read by its
    field's type at once (the dict stays plain YAML data); an unknown key keeps its text, for the
    unknown-key check to name when the config is built."""
    for item in overrides:
        section, name, value = _parse_override(item)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise UserError(f"config section {section!r} must be a mapping, got {raw[section]!r}")
        hint = typing.get_type_hints(SECTIONS[section]).get(name) if section in SECTIONS else None
        raw[section][name] = value if hint is None else value.resolve(hint)
    return raw


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against a type hint; allow int for float and the YAML-1.1 '1e-4' string."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(key, value, arg)
            except UserError:
                pass
        raise UserError(f"{key}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise UserError(f"{key}: expected a list of {_type_name(item_hint)}, got {value!r}")
        return [coerce(f"{key}[{i}]", v, item_hint) for i, v in enumerate(value)]
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # PyYAML reads 1e-4 (no dot) as a string
            except ValueError:
                pass
        if number is not None:
            # NaN passes every range check (comparisons with it are false) and inf breaks schedules
            if not math.isfinite(number):
                raise UserError(f"{key}: expected a finite number, got {value!r}")
            return number
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, hint):
        return value
    raise UserError(f"{key}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def _build_section(name: str, raw: Any) -> Any:
    cls = SECTIONS[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"config section {name!r} must be a mapping of keys, got {raw!r}")
    valid = _valid_keys(name)
    for key in raw:
        if key not in valid:
            raise UserError(f"unknown config key '{name}.{key}'; valid keys in {name}: {', '.join(valid)}")
    preset = raw.get("preset")
    if isinstance(preset, _Override):
        preset = preset.resolve(str | None)
    if name == "model" and preset is not None:
        if not isinstance(preset, str) or preset not in PRESETS:
            raise UserError(f"model.preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        raw = {**PRESETS[preset], **raw}
    hints = typing.get_type_hints(cls)
    raw = {k: v.resolve(hints[k]) if isinstance(v, _Override) else v for k, v in raw.items()}
    return cls(**{key: coerce(f"{name}.{key}", value, hints[key]) for key, value in raw.items()})


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Typed, validated Config from a raw dict (as read from YAML)."""
    if not isinstance(raw, dict):
        raise UserError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    version = raw.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= SCHEMA_VERSION:
        raise UserError(f"schema_version: this raygpt reads config schema 1..{SCHEMA_VERSION}, got {version!r}")
    for key in raw:
        if key != "schema_version" and key not in SECTIONS:
            raise UserError(f"unknown config section {key!r}; valid: schema_version, {', '.join(SECTIONS)}")
    cfg = Config(schema_version=version, **{name: _build_section(name, raw.get(name)) for name in SECTIONS})
    validate(cfg)
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, "a key is a list or a mapping (keys are plain "
                                                        "names)", key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


def read_yaml_file(path: str | Path, what: str) -> Any:
    """A YAML file's content; not UTF-8, not YAML or a key given twice is one line naming the
    file and the line."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 text "
                        f"(byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror}") from None
    return parse_yaml(text, f"{what} {path}")


def parse_yaml(text: str, where: str) -> Any:
    """YAML text as data (safe types only); not YAML, a key given twice or a list as a key,
    nesting past Python's recursion limit: one line naming `where` and the line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "cannot parse"
        raise UserError(f"{where} is not valid YAML{at}: {problem}") from None
    except RecursionError:
        raise UserError(f"{where} is not valid YAML: nested too deeply") from None


def read_stored_yaml(uri: str, what: str) -> dict[str, Any]:
    """A YAML mapping raygpt wrote into storage (a run's config.yaml, a search's search.yaml),
    read back as data: not UTF-8, not YAML, a key twice or not a mapping is one line naming it."""
    from raygpt import storage

    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {uri} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                        f"{exc.start})") from None
    except (OSError, FileNotFoundError) as exc:
        raise UserError(f"cannot read {what} {uri}: {getattr(exc, 'strerror', None) or exc}") from None
    data = parse_yaml(text, f"{what} {uri}")
    if not isinstance(data, dict):
        raise UserError(f"{what} {uri} must hold a mapping, got {type(data).__name__}")
    return data


TRANSFERABLE = ("optim", "train")  # what --set-from may carry from one config to another


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                set_from: str | Path | None = None, keys: tuple[str, ...] = ("optim",)) -> Config:
    """Read a YAML config file (or start from defaults when `path` is None), take the sections
    `keys` whole from the config file `set_from` (a search's best_config.yaml: tune small, train
    big), then apply overrides."""
    raw = _read_config_file(path) if path is not None else {}
    if set_from is not None:
        raw = _take_sections(raw, set_from, keys, overrides)
    return config_from_dict(apply_overrides(raw, list(overrides)))


def _read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    raw = read_yaml_file(path, "config file") or {}
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def _take_sections(raw: dict[str, Any], set_from: str | Path, keys: tuple[str, ...],
                   overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`raw` with the sections `keys` of the config `set_from`. Carrying a learning rate across
    widths holds under µP with the same base width; across parametrizations or base widths it
    means nothing, and is refused."""
    bad = [k for k in keys if k not in TRANSFERABLE]
    if bad or not keys:
        raise UserError(f"--keys takes sections of {', '.join(TRANSFERABLE)}, got {','.join(keys) or 'nothing'}")
    source = config_from_dict(_read_config_file(set_from))
    target = config_from_dict(apply_overrides(raw, list(overrides))).model
    for key in ("parametrization", "mup_base_width"):
        if (key == "parametrization" or target.parametrization == "mup") and \
                getattr(source.model, key) != getattr(target, key):
            raise UserError(f"--set-from {set_from}: its model.{key} is {getattr(source.model, key)!r}, this "
                            f"config's {getattr(target, key)!r}; searched settings carry over only between models "
                            "of the same parametrization and base width")
    taken = source.to_dict()
    return {**raw, **{k: taken[k] for k in keys}}


def is_plain_name(name: str) -> bool:
    """A name that stays one folder inside its parent: no separators, not '.' or '..'."""
    return re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", name) is not None


def validate(cfg: Config) -> None:
    """Cross-field and range checks; the first problem found raises a one-line UserError."""
    m, d, o, t, r = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.run
    positive = {
        "model.embedding_dim": m.embedding_dim, "model.num_layers": m.num_layers,
        "model.num_heads": m.num_heads, "model.context_len": m.context_len,
        "model.vocabulary_size": m.vocabulary_size, "train.batch_size": t.batch_size,
        "train.num_epochs": t.num_epochs, "train.max_steps": t.max_steps,
        "train.max_tokens": t.max_tokens, "train.grad_accum_steps": t.grad_accum_steps,
        "train.eval_freq": t.eval_freq, "train.eval_iter": t.eval_iter, "train.log_freq": t.log_freq,
        "train.save_freq": t.save_freq, "run.num_workers": r.num_workers,
        "run.cpus_per_worker": r.cpus_per_worker, "run.gpus_per_worker": r.gpus_per_worker,
        "run.num_to_keep": r.num_to_keep,
        "run.resource_wait_s": r.resource_wait_s,
        "optim.peak_lr": o.peak_lr, "optim.max_norm": o.max_norm, "optim.eps": o.eps,
    }
    for key, value in positive.items():
        if value is not None and value <= 0:
            raise UserError(f"{key} must be > 0, got {value}")
    if r.accelerator_type is not None and r.accelerator_type not in GPU_MEMORY_GB:
        raise UserError(f"run.accelerator_type must be one of {', '.join(GPU_MEMORY_GB)} (or null), "
                        f"got {r.accelerator_type!r}")
    if not 0 <= t.seed < 2**63:  # torch's and numpy's generators take it as a signed 64-bit integer
        raise UserError(f"train.seed must be an integer in [0, 2^63), got {t.seed}")
    if m.vocabulary_size > MAX_VOCABULARY:
        raise UserError(f"model.vocabulary_size must be at most {MAX_VOCABULARY:,} (token ids are stored as "
                        f"uint16: below 65,536), got {m.vocabulary_size:,}")
    if m.parametrization not in PARAMETRIZATIONS:
        raise UserError(f"model.parametrization must be one of {', '.join(PARAMETRIZATIONS)}, "
                        f"got {m.parametrization!r}")
    if m.mup_base_width <= 0:
        raise UserError(f"model.mup_base_width must be > 0, got {m.mup_base_width}")
    if m.parametrization == "mup" and m.tie_embeddings:
        raise UserError("model.parametrization mup with model.tie_embeddings: the shared matrix would be both an "
                        "input embedding (base lr) and the readout (divided by the width); untie it")
    if r.strategy not in STRATEGIES:
        raise UserError(f"run.strategy must be one of {', '.join(STRATEGIES)}, got {r.strategy!r}")
    if r.use_gpu and r.gpus_per_worker > 1:
        raise UserError(f"run.gpus_per_worker {r.gpus_per_worker:g}: a worker trains on one GPU, the others would "
                        "idle; use 1 and more run.num_workers")
    if r.use_gpu and r.num_workers > 1 and r.gpus_per_worker < 1:
        raise UserError(f"run.gpus_per_worker {r.gpus_per_worker:g} with {r.num_workers} workers: two workers would "
                        "share one GPU, which NCCL refuses; use 1 (a fraction suits one-worker runs, such as search "
                        "trials)")
    unknown = [name for name in r.loggers if name not in LOGGERS]
    if unknown:
        raise UserError(f"run.loggers: unknown logger {unknown[0]!r}; choose from {', '.join(LOGGERS)}")
    twice = [name for name in LOGGERS if r.loggers.count(name) > 1]
    if twice:
        raise UserError(f"run.loggers lists {twice[0]!r} twice")
    if r.wandb_mode is not None and r.wandb_mode not in WANDB_MODES:
        raise UserError(f"run.wandb_mode must be one of {', '.join(WANDB_MODES)} (or null), got {r.wandb_mode!r}")
    if r.name is not None and not is_plain_name(r.name):
        raise UserError(f"run.name must be a plain folder name (letters, digits, '.', '_', '-'), got {r.name!r}")
    if t.eval_mode not in EVAL_MODES:
        raise UserError(f"train.eval_mode must be one of {', '.join(EVAL_MODES)}, got {t.eval_mode!r}")
    if t.eval_tokens < 1:
        raise UserError(f"train.eval_tokens must be >= 1, got {t.eval_tokens}")
    if t.final_eval_tokens is not None and t.final_eval_tokens < 1:
        raise UserError(f"train.final_eval_tokens must be >= 1 (or null: the whole split), got {t.final_eval_tokens}")
    if t.precision not in PRECISIONS:
        raise UserError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
    if m.pad_vocab_multiple < 1:
        raise UserError(f"model.pad_vocab_multiple must be >= 1 (1: no padding), got {m.pad_vocab_multiple}")
    if r.peak_tflops is not None and r.peak_tflops <= 0:
        raise UserError(f"run.peak_tflops must be > 0 (or null), got {r.peak_tflops}")
    if d.source not in (None, "stdlib"):
        raise UserError(f"data.source must be 'stdlib' or null, got {d.source!r}")
    if d.stride is not None and d.stride <= 0:
        raise UserError(f"data.stride must be > 0 (or null for context_len), got {d.stride}")
    if m.embedding_dim % m.num_heads:
        raise UserError(
            f"model.embedding_dim ({m.embedding_dim}) must be divisible by model.num_heads ({m.num_heads})"
        )
    if not 0.0 <= m.dropout < 1.0:
        raise UserError(f"model.dropout must be in [0, 1), got {m.dropout}")
    for key, value in {"optim.initial_lr": o.initial_lr, "optim.min_lr": o.min_lr,
                       "optim.warmup_steps": o.warmup_steps, "optim.weight_decay": o.weight_decay,
                       "run.max_failures": r.max_failures}.items():
        if value < 0:
            raise UserError(f"{key} must be >= 0, got {value}")
    if o.min_lr > o.peak_lr:
        raise UserError(f"optim.min_lr ({o.min_lr}) must be <= optim.peak_lr ({o.peak_lr})")
    if o.initial_lr > o.peak_lr:
        raise UserError(f"optim.initial_lr ({o.initial_lr}) must be <= optim.peak_lr ({o.peak_lr})")
    f = cfg.fault
    if f.kind not in FAULT_KINDS:
        raise UserError(f"fault.kind must be one of {', '.join(FAULT_KINDS)}, got {f.kind!r}")
    if not 0 <= f.rank < r.num_workers:
        raise UserError(f"fault.rank must be in [0, run.num_workers={r.num_workers}), got {f.rank}")
    if f.crash_at_step is not None and f.crash_at_step <= 0:
        raise UserError(f"fault.crash_at_step must be > 0 (or null: off), got {f.crash_at_step}")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise UserError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    t.evals = check_evals(t.evals, t.eval_freq)


def check_evals(evals: list[dict], eval_freq: int) -> list[dict]:
    """train.evals with every key filled in (limit None, name = task), or a one-line error."""
    out, names = [], set()
    for i, e in enumerate(evals):
        where = f"train.evals[{i}]"
        unknown = sorted(set(e) - set(EVAL_KEYS))
        if unknown:
            raise UserError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(EVAL_KEYS)}")
        e = {"limit": None, **e}
        e.setdefault("name", e.get("task"))
        if e.get("task") not in EVAL_TASKS:
            raise UserError(f"{where}.task must be one of {', '.join(EVAL_TASKS)}, got {e.get('task')!r}")
        if not isinstance(e.get("data"), str) or not e["data"]:
            raise UserError(f"{where}.data must be the path or URI of a jsonl file, got {e.get('data')!r}")
        every = e.get("every")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1 or every % eval_freq:
            raise UserError(f"{where}.every must be a positive multiple of train.eval_freq ({eval_freq}): evals "
                            f"run at reports, got {every!r}")
        limit = e["limit"]
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise UserError(f"{where}.limit must be a positive number of items (or null: all), got {limit!r}")
        if not isinstance(e["name"], str) or not re.fullmatch(r"[a-z][a-z0-9_]*", e["name"]):
            raise UserError(f"{where}.name must be lower-case letters, digits and '_' (a metric prefix), "
                            f"got {e['name']!r}")
        if e["name"] in names:
            raise UserError(f"{where}.name {e['name']!r} is used twice: give each eval its own name")
        names.add(e["name"])
        out.append({k: e[k] for k in EVAL_KEYS})
    return out


def eval_metrics(evals: list[dict]) -> list[str]:
    """The metrics train.evals adds to every report."""
    return [f"{e.get('name') or e.get('task')}_{score}" for e in evals for score in ("acc", "acc_norm")]
