"""Run configuration: one pydantic model per section, loaded from YAML plus `a.b=c` overrides.

Every key is documented in configs/demo.yaml (one line each, Ultralytics default.yaml style).
Unknown keys and wrong types raise `ConfigError` with the dotted key and what is allowed;
the entry points turn it into one line on stderr and exit status 2.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from instseg.errors import ConfigError
from instseg.redaction import redact


class _Section(BaseModel):
    # extra="forbid" turns a typo in a key into an error instead of a silently ignored setting
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads `epochs: true` as 1; YAML's true/yes/on is a bool, never a count
        annotation = cls.model_fields[info.field_name].annotation if info.field_name else None
        if isinstance(value, bool) and bool not in (annotation, *get_args(annotation)) and annotation is not Any:
            raise ValueError(f"expected a {_type_name(annotation)}, got the boolean {str(value).lower()}")
        return value


def _type_name(annotation: Any) -> str:
    names = {int: "whole number", float: "number", str: "string"}
    options = [a for a in (get_args(annotation) or (annotation,)) if a is not type(None)]
    return " or ".join(dict.fromkeys(names.get(a, "value") for a in options))


class DataConfig(_Section):
    root: str = "data/synth"
    train_split: str = "train"
    val_split: str = "val"
    synth_images: int = Field(48, ge=2)
    batch_size: int = Field(2, ge=1)
    num_workers: int = Field(0, ge=0)
    hflip_prob: float = Field(0.5, ge=0.0, le=1.0)
    on_invalid: Literal["error", "skip"] = "error"
    aspect_ratio_grouping: bool = False
    pin_memory: bool = True  # applied only when a GPU is present
    persistent_workers: bool = True  # applied only when num_workers > 0
    index_cache: str | None = None  # annotation indexes (instseg.data.index); None: ROOT/.instseg-index


WEIGHT_KEYS = ("weights", "backbone_weights")  # ModelConfig keys that name a weights source


class ModelConfig(_Section):
    arch: Literal["maskrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn", "tiny"] = "maskrcnn_resnet50_fpn_v2"
    weights: str = "DEFAULT"
    backbone_weights: str = "none"
    # a list is multi-scale training (scale jitter): each training batch picks one size at random,
    # evaluation uses the last; torchvision's transform resizes image, boxes and masks together
    min_size: Annotated[int, Field(ge=32)] | Annotated[list[Annotated[int, Field(ge=32)]], Field(min_length=1)] = 800
    max_size: int = Field(1333, ge=32)
    trainable_backbone_layers: int = Field(3, ge=0, le=6)
    box_score_thresh: float = Field(0.05, ge=0.0, le=1.0)
    box_detections_per_img: int = Field(100, ge=1)
    mask_dice_weight: float = Field(0.0, ge=0.0)
    sync_batchnorm: bool = False

    @field_validator(*WEIGHT_KEYS)
    @classmethod
    def _weights_known(cls, value: str) -> str:
        if value.upper() in ("DEFAULT", "NONE") or value.endswith((".pt", ".pth")):
            return value
        raise ValueError("must be DEFAULT, none, or a path to a .pt/.pth state dict")


CUDNN_BENCHMARK_REFUSAL = (
    "true is refused: it made training 2.2x slower (0.46x: R50-FPN v2, 800 px, bf16, one H200; bench/gpu_train.py "
    "levers). Mask R-CNN's RoI heads change shape every step, so cuDNN tunes its convolutions again every step. "
    "Remove the key"
)


class TrainConfig(_Section):
    epochs: int = Field(12, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.02, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    lr_scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_iters: int = Field(50, ge=0)
    patience: int = Field(0, ge=0)
    min_delta: float = Field(0.0, ge=0.0)
    log_every: int = Field(10, ge=1)
    progress: Literal["auto", "bar", "lines", "off"] = "auto"
    plot_every: int = Field(5, ge=0)  # also log the validation grid every N epochs (0: after the last only)
    # linear scaling rule (Goyal et al. 2017): lr is right for lr_reference_batch images per step and is
    # multiplied by global_batch / lr_reference_batch; null = data.batch_size (lr scales with the workers)
    lr_reference_batch: int | None = Field(None, ge=1)
    amp: Literal["off", "bf16", "fp16"] = "off"
    grad_clip_norm: float = Field(0.0, ge=0.0)
    channels_last: bool = False
    # refused when true (see _no_cudnn_benchmark); the key stays so that configs that turn it off still load
    cudnn_benchmark: bool = False

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML reads an unquoted `off` (train.amp=off) as false

    @field_validator("cudnn_benchmark")
    @classmethod
    def _no_cudnn_benchmark(cls, value: bool) -> bool:
        if value:
            raise ValueError(CUDNN_BENCHMARK_REFUSAL)
        return value


class MetricsConfig(_Section):
    # Fitness = sum(weight * metric): old Ultralytics segmentation fitness (0.1 mAP50 + 0.9 mAP50-95, box + mask)
    fitness_weights: dict[str, float] = Field(
        default_factory=lambda: {
            "val/bbox_map50": 0.1,
            "val/bbox_map": 0.9,
            "val/segm_map50": 0.1,
            "val/segm_map": 0.9,
        }
    )
    # faster-coco-eval gives pycocotools' stats several times faster (bench/eval.py); pycocotools is the original
    backend: Literal["faster", "pycocotools"] = "faster"
    ultralytics_compat: bool = False  # P / R / F1 and confusion matrix exactly as Ultralytics 8.x computes them


class RayConfig(_Section):
    address: str | None = None
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    # below 1, trials share a GPU (e.g. 0.25: four at once); one worker per trial then (see _shared_gpu_one_worker)
    gpus_per_worker: float = Field(1.0, gt=0.0, le=1.0)
    storage_path: str = "ray_results"
    max_failures: int = Field(0, ge=-1)
    max_startup_failures: int = Field(3, ge=-1)
    checkpoints_to_keep: int = Field(2, ge=1)


class TrackingConfig(_Section):
    uri: str | None = None
    experiment: str = "instseg"
    system_metrics_s: float = Field(10.0, ge=0.0)  # 0 = off


class RegistryConfig(_Section):
    model_name: str = "instseg-maskrcnn"
    min_improvement: float = Field(0.0, ge=0.0)  # fitness a challenger must gain over the champion to replace it


# what PBT may change between epochs: values a run restored from a checkpoint takes on as they are (the optimizer's
# are applied over its restored state: instseg.engine.optim.apply_optimizer_settings)
PBT_EXPLORABLE = ("train.lr", "train.weight_decay", "train.momentum", "train.grad_clip_norm", "data.hflip_prob")


class SearchDimension(_Section):
    type: Literal["loguniform", "uniform", "choice", "randint"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None


class TuneConfig(_Section):
    num_samples: int = Field(4, ge=1)
    max_concurrent_trials: int = Field(2, ge=1)
    seed: int = 0
    search: Literal["optuna-tpe", "optuna-cmaes", "random", "bohb"] = "optuna-tpe"
    scheduler: Literal["asha", "hyperband", "median", "pbt", "none"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)
    min_samples_required: int = Field(3, ge=1)  # median: trials that must have reached an epoch before it judges
    perturbation_interval: int = Field(2, ge=1)  # pbt: epochs between exploit/explore steps
    quantile_fraction: float = Field(0.25, gt=0.0, le=0.5)  # pbt: the bottom share clones the top share
    resample_probability: float = Field(0.25, ge=0.0, le=1.0)  # pbt: draw a value anew instead of scaling it
    search_space: dict[str, SearchDimension] = Field(default_factory=dict)


class Config(_Section):
    seed: int = 0
    # also the Ray Train folder name and the key a rerun resumes by: letters, digits, . _ -
    run_name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=200)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @model_validator(mode="after")
    def _sync_batchnorm_needs_gpus(self) -> "Config":
        if self.model.sync_batchnorm and not self.ray.use_gpu:
            raise ValueError("model.sync_batchnorm needs ray.use_gpu=true (SyncBatchNorm runs on GPUs only)")
        return self

    @model_validator(mode="after")
    def _shared_gpu_one_worker(self) -> "Config":
        if self.ray.gpus_per_worker < 1 and self.ray.num_workers > 1:
            raise ValueError(
                f"ray.gpus_per_worker={self.ray.gpus_per_worker} puts several workers on one GPU, which DDP cannot "
                "do (NCCL needs a GPU per rank): use it with ray.num_workers=1, to run trials side by side"
            )
        return self

    @model_validator(mode="after")
    def _bohb_with_hyperband(self) -> "Config":
        # BOHB is one algorithm in two halves: its searcher and its HyperBand scheduler need each other
        if self.tune.search == "bohb" and self.tune.scheduler != "hyperband":
            raise ValueError(
                f"tune.search=bohb needs tune.scheduler=hyperband (got {self.tune.scheduler}): BOHB's searcher "
                "learns from HyperBand's brackets"
            )
        return self

    @model_validator(mode="after")
    def _pbt_settings(self) -> "Config":
        # PBT's population trains side by side in lockstep, and a weak trial continues from a strong one's checkpoint
        # with explored values: only values a restored run can take on without changing its shape may be explored
        if self.tune.scheduler != "pbt":
            return self
        problems = []
        if self.tune.search != "random":
            problems.append(f"tune.search=random (got {self.tune.search}: PBT explores by itself)")
        if self.tune.num_samples > self.tune.max_concurrent_trials:
            problems.append(
                f"tune.num_samples ({self.tune.num_samples}) <= tune.max_concurrent_trials "
                f"({self.tune.max_concurrent_trials}): the population trains at once"
            )
        if self.train.patience:
            problems.append("train.patience=0 (PBT replaces weak trials instead of stopping them)")
        fixed = sorted(set(self.tune.search_space) - set(PBT_EXPLORABLE))
        if fixed:
            problems.append(f"tune.search_space keys among {', '.join(PBT_EXPLORABLE)} (got {', '.join(fixed)})")
        if problems:
            raise ValueError(f"tune.scheduler=pbt needs {'; '.join(problems)}")
        return self

    @model_validator(mode="after")
    def _one_weights_source(self) -> "Config":
        if self.model.weights.upper() != "NONE" and self.model.backbone_weights.upper() != "NONE":
            raise ValueError("set model.weights (the whole model) or model.backbone_weights (its backbone), not both")
        return self

    def global_batch(self) -> int:
        """Images per optimizer step across all workers."""
        return self.data.batch_size * self.ray.num_workers

    def effective_lr(self) -> float:
        """train.lr scaled by the linear rule to the global batch (see TrainConfig)."""
        reference = self.train.lr_reference_batch or self.data.batch_size
        return self.train.lr * self.global_batch() / reference


def _field_path(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop pydantic's union-branch tags ('constrained-int', 'list[int]') from an error location."""
    return tuple(part for part in loc if isinstance(part, int) or str(part).isidentifier())


def _describe_errors(errors: list[dict[str, Any]], source: str) -> str:
    """One line for the first failing key; a union's branch messages are joined with 'or'."""
    first = errors[0]
    path = _field_path(first["loc"])
    same_key = [e for e in errors if _field_path(e["loc"])[: len(path)] == path]
    messages = list(dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in same_key))
    return _describe_error({**first, "loc": path, "msg": " or ".join(messages)}, source)


def _describe_error(error: dict[str, Any], source: str) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if not key:  # a rule across sections (model validator): its message names the keys
        return f"{source}: {error['msg'].removeprefix('Value error, ')}"
    if error["type"] == "extra_forbidden":
        return f"{source}: {_unknown_key(key, _section_at(tuple(error['loc'][:-1])))}"
    got = error.get("input")
    return f"{source}: invalid value for '{key}': {error['msg']} (got {got!r})"


def _unknown_key(dotted: str, section: type[BaseModel] | None) -> str:
    """ "unknown config key 'train.epoch' (did you mean train.epochs?)", else the keys allowed there."""
    close = difflib.get_close_matches(dotted, _dotted_keys(Config), n=1, cutoff=0.75)
    if close:
        return f"unknown config key '{dotted}' (did you mean {close[0]}?)"
    allowed = ", ".join(sorted(section.model_fields)) if section else "see configs/demo.yaml"
    return f"unknown config key '{dotted}' (allowed here: {allowed})"


def _dotted_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key of a config section, sections and their leaves, as dotted paths."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _dotted_keys(annotation, f"{prefix}{name}.")
    return keys


def _check_override_key(path: list[str], text: str) -> None:
    """An override names a known key (or a key inside a mapping-valued one, such as tune.search_space)."""
    model: type[BaseModel] = Config
    for part in path:
        field = model.model_fields.get(part)
        if field is None:
            raise ConfigError(f"override '{text}': {_unknown_key('.'.join(path), model)}")
        annotation = field.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return
        model = annotation


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Build a Config from a plain dict, turning the first validation error into a ConfigError."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe_errors(exc.errors(), source)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=0.01` -> (['train', 'lr'], 0.01); the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' must look like section.key=value")
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


def set_dotted(raw: dict[str, Any], path: list[str], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{'.'.join(path)}': '{part}' is not a section")
        node = child
    node[path[-1]] = value


def load(path: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load YAML (or the defaults when path is None) and apply `a.b=c` overrides."""
    raw: dict[str, Any] = {}
    source = "config"
    if path is not None:
        source = str(path)
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {file} (try configs/demo.yaml)")
        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file}: cannot read it as text ({exc})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: not valid YAML: {exc}".splitlines()[0]) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{file}: top level must be a mapping of sections")
    for override in overrides:
        keys, value = parse_override(override)
        _check_override_key(keys, override)
        set_dotted(raw, keys, value)
    cfg = config_from_dict(raw, source)
    check_search_space(cfg)
    return cfg


def check_search_space(cfg: Config) -> None:
    """The one check of tune.search_space, at load: each key names a config key, each dimension is well formed,
    and every value it can produce (its bounds, its choices) is a valid value of its key."""
    for key, dim in cfg.tune.search_space.items():
        check_dotted_key(key)
        where = f"tune.search_space.{key}"
        if dim.type == "choice":
            if not dim.values:
                raise ConfigError(f"{where}: type choice needs a non-empty 'values' list")
            samples = dim.values
        elif dim.low is None or dim.high is None or dim.low >= dim.high:
            raise ConfigError(f"{where}: type {dim.type} needs low < high (got low={dim.low}, high={dim.high})")
        elif dim.type == "loguniform" and dim.low <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0 (got {dim.low})")
        else:
            samples = [int(dim.low), int(dim.high)] if dim.type == "randint" else [dim.low, dim.high]
        for value in samples:
            try:
                apply_overrides(cfg, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None


def check_dotted_key(dotted: str) -> None:
    """Raise ConfigError unless `dotted` names a leaf key of Config (used for search spaces)."""
    *sections, leaf = dotted.split(".")
    model = _section_at(tuple(sections))
    if model is None or leaf not in model.model_fields:
        raise ConfigError(f"search space key '{dotted}' is not a config key")


def apply_overrides(cfg: Config, values: dict[str, Any]) -> Config:
    """A copy of cfg with dotted keys replaced (Tune's sampled parameters), validated again."""
    raw = cfg.model_dump()
    for dotted, value in values.items():
        set_dotted(raw, dotted.split("."), value)
    return config_from_dict(raw, "search space")


def flatten(cfg: Config) -> dict[str, Any]:
    """Dotted key -> scalar, for MLflow params (lists and dicts become their string form; URIs redacted)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and prefix != "tune.search_space":
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            scalar = isinstance(node, (int, float, str, bool)) or node is None
            flat[prefix] = redact(node) if scalar else redact(str(node))

    walk("", cfg.model_dump())
    return flat


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def absolute_tracking_uri(uri: str | None, base: Path | None = None) -> str:
    """config value > MLFLOW_TRACKING_URI > sqlite:///mlflow.db, with a relative sqlite or file path

    made absolute against `base` (default: the cwd)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    base = base or Path.cwd()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str((base / uri[len("sqlite:///") :]).resolve())
    if "://" not in uri:
        return str((base / uri).resolve())
    return uri


# Ray unpacks a job's working_dir into <session>/runtime_resources/working_dir_files/<package>/ and runs the
# job there: a temporary copy, without the folders runtime_env excludes (data/, ray_results/, *.db)
JOB_COPY_FOLDERS = ("runtime_resources", "working_dir_files")


def in_ray_job_copy(base: Path) -> bool:
    """Whether `base` is inside Ray's copy of a job's working_dir: Ray's two folders, in that order, with the
    package below them (not a folder name anywhere in the path, which a user's own checkout may contain)."""
    parts = base.parts
    width = len(JOB_COPY_FOLDERS)
    return any(parts[i : i + width] == JOB_COPY_FOLDERS for i in range(len(parts) - width))


def resolve_paths(cfg: Config, base: Path | None = None) -> Config:
    """Make relative paths and the tracking URI absolute against `base` (the driver's cwd) before
    they reach Ray tasks and workers, whose working directory is not the driver's. Inside a Ray job's copy of
    the working directory, relative paths that would miss the data or write results into that copy are refused
    (check_job_paths)."""
    base = base or Path.cwd()
    if in_ray_job_copy(base):
        check_job_paths(cfg, base)
    data_root = str((base / cfg.data.root).resolve())
    index_cache = str((base / cfg.data.index_cache).resolve()) if cfg.data.index_cache else None
    storage = cfg.ray.storage_path
    if "://" not in storage:
        storage = str((base / storage).resolve())
    weights = {}
    for key in WEIGHT_KEYS:
        value = getattr(cfg.model, key)
        weights[key] = str((base / value).resolve()) if value.endswith((".pt", ".pth")) else value
    return cfg.model_copy(
        update={
            "data": cfg.data.model_copy(update={"root": data_root, "index_cache": index_cache}),
            "ray": cfg.ray.model_copy(update={"storage_path": storage}),
            "model": cfg.model.model_copy(update=weights),
            "tracking": cfg.tracking.model_copy(update={"uri": absolute_tracking_uri(cfg.tracking.uri, base)}),
        }
    )


def check_job_paths(cfg: Config, base: Path) -> None:
    """ConfigError for relative paths in a job that runs in Ray's copy of the working directory (`base`): a
    data.root missing from the copy, and any relative storage path or sqlite file, which would land in the
    copy and be deleted with it. The message says what to pass instead, expanded on the submitting side."""
    problems = []
    if not Path(cfg.data.root).is_absolute() and not (base / cfg.data.root).exists():
        problems.append(("data.root", cfg.data.root, "where it is missing", f"data.root=$PWD/{cfg.data.root}"))
    if "://" not in cfg.ray.storage_path and not Path(cfg.ray.storage_path).is_absolute():
        problems.append(
            (
                "ray.storage_path",
                cfg.ray.storage_path,
                "so checkpoints would be deleted with the copy",
                f"ray.storage_path=$PWD/{cfg.ray.storage_path} (a folder every node mounts)",
            )
        )
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        problems.append(
            (
                "tracking.uri",
                uri,
                "so the MLflow database would be deleted with the copy",
                f"tracking.uri=sqlite:///$PWD/{uri[len('sqlite:///') :]} or an MLflow server's URL",
            )
        )
    if problems:
        key, value, why, fix = problems[0]
        more = f" (also: {', '.join(p[3] for p in problems[1:])})" if len(problems) > 1 else ""
        raise ConfigError(
            f"{key} '{value}' is relative, and inside a Ray job it resolves against the job's temporary copy of the "
            f"working directory ({base}), {why}: pass an absolute path, expanded on the submitting side, e.g. "
            f"{fix}{more}"
        )
