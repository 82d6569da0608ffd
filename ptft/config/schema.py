"""The config schema: one frozen pydantic model per YAML section, and `Config` over them all.

Field docstrings are the descriptions of the README's config reference
(`scripts/config_reference.py` generates it), so they are written for users.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidatorFunctionWrapHandler, field_validator
from pydantic import model_serializer, model_validator
from pydantic_core import PydanticCustomError


def _conflict(keys: tuple[str, ...], message: str) -> PydanticCustomError:
    # The keys ride along in ctx so that the message can name every key involved.
    return PydanticCustomError("conflict", "{message}", {"keys": keys, "message": message})


def _device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise ValueError("auto, cpu, cuda, cuda:N or mps")  # read as "expected <this>, got <value>"
    return value


_NORMALIZE_EXPECTED = "none, dataset, imagenet or {mean: [...], std: [...]} with one std > 0 per mean"


def _normalize(value: str | dict[str, list[float]]) -> str | dict[str, list[float]]:
    # The channel count is the data's: ptft.data.normalize checks it once the images are known.
    if isinstance(value, str):
        if value not in ("none", "dataset", "imagenet"):
            raise ValueError(_NORMALIZE_EXPECTED)
        return value
    mean, std = value.get("mean"), value.get("std")
    if set(value) != {"mean", "std"} or not mean or len(mean) != len(std) or min(std) <= 0:
        raise ValueError(_NORMALIZE_EXPECTED)
    return value


_LARGER_IS_BETTER = frozenset({"acc", "accuracy", "top1", "top5", "f1", "precision", "recall", "auc", "psnr", "ssim",
                               "iou", "dice"})
_SMALLER_IS_BETTER = frozenset({"loss", "mse", "rmse", "mae", "nll", "error", "err", "perplexity", "ppl"})


def metric_mode(monitor: str) -> Literal["min", "max"] | None:
    """'max' for accuracy-like metrics, 'min' for loss-like ones, by the name's last word; None when unknown.

    `val/acc`, `val/knn_acc`, `val/macro_f1` -> max; `val/loss`, `val/recon_mse` -> min; `val/sharpness` -> None.
    """
    word = re.split(r"[/_.\-]", monitor.lower())[-1]
    if word in _LARGER_IS_BETTER:
        return "max"
    if word in _SMALLER_IS_BETTER:
        return "min"
    return None


def _bool_became_number(value: object, result: object) -> bool:
    """Whether validating `value` into `result` turned a true/false, at any depth, into a number."""
    if isinstance(value, bool):
        return not isinstance(result, bool)
    if isinstance(value, (list, tuple)) and isinstance(result, (list, tuple)):
        return any(map(_bool_became_number, value, result))
    if isinstance(value, dict) and isinstance(result, dict):
        return any(map(_bool_became_number, value.values(), result.values()))
    return False


class _NoBoolsAsNumbers(BaseModel):
    # Lax mode stays, because YAML 1.1 hands `lr: 1e-3` over as the string '1e-3'; but lax mode
    # would also read `max_steps: true` as 1 and `lr: true` as 1.0, a mistake no one means.
    @field_validator("*", mode="wrap")
    @classmethod
    def _refuse_bools_as_numbers(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        result = handler(value)
        if _bool_became_number(value, result):
            raise PydanticCustomError("bool_as_number", "true or false where a number is expected")
        return result


class BuilderOptions(_NoBoolsAsNumbers):
    """Base of the models built from a registry builder's keyword-only parameters."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class _Section(_NoBoolsAsNumbers):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class RunSection(_Section):
    """Where the run writes, and its seed."""

    dir: str = "runs/default"
    """Output directory of the run (default: runs/<stem of the config file>)."""
    seed: int = Field(0, ge=0)
    """Global seed: initialisation, batch order, noise, masks and augmentations."""


class DataSection(_Section):
    """The dataset, its validation split and the labelled subset used for finetuning."""

    name: str = "digits"
    """Dataset from the DATASETS registry (`ptft models` lists them)."""
    root: str = "data"
    """Folder holding the dataset's files."""
    download: bool = False
    """Download missing files; otherwise missing files are an error."""
    image_size: int | None = Field(None, ge=1)
    """imagefolder: resize every image to this size squared (null: they must all share one size)."""
    resize: Literal["crop", "stretch"] = "crop"
    """imagefolder with image_size: crop (shorter side to size, centre kept) or stretch (aspect ignored)."""
    decode_size: int | None = Field(None, ge=1)
    """imagefolder with image_size: decode and keep images at this larger size squared, so training crops come
    from more pixels; every other batch is the whole image resized to image_size (null: image_size)."""
    skip_bad_files: bool = False
    """imagefolder: skip unreadable images, listing them on stderr (false: refuse, naming the file)."""
    cache_dir: str | None = None
    """imagefolder: the decode cache every stage and rank maps (null: $XDG_CACHE_HOME/ptft or ~/.cache/ptft)."""
    decoder: Literal["auto", "pil", "simplejpeg"] = "auto"
    """imagefolder: how JPEGs are decoded, the same pixels either way: simplejpeg (faster; pip install
    'ptft[jpeg]'), pil, or auto (simplejpeg where installed)."""
    normalize: Annotated[str | dict[str, list[float]], AfterValidator(_normalize)] = "none"
    """(x - mean) / std per channel after augmentation: none, dataset, imagenet or {mean: [..], std: [..]}."""
    placement: Literal["auto", "device", "host"] = "auto"
    """Where the splits a stage reads live: device (one tensor on it), host (host memory or the mapped decode
    cache, each batch copied over with the next prefetched: data larger than the device) or auto (device
    when they fit half the free device memory, else host; device on the CPU)."""
    batch_size: int = Field(128, ge=1)
    """Training batch size (global: split across processes under torchrun)."""
    sampler: Literal["random", "balanced"] = "random"
    """Training batches: random (shuffled, each example once per epoch) or balanced (drawn with replacement,
    every class equally likely: for an imbalanced labelled subset; objectives that use labels only)."""
    eval_batch_size: int = Field(1024, ge=1)
    """Batch size of validation and evaluation."""
    val_fraction: float = Field(0.1, gt=0, lt=1)
    """Fraction of the dataset's train split held out for validation."""
    val_labels_per_class: int | None = Field(None, ge=1)
    """Hold out this many examples per class for validation instead of val_fraction: a validation split as
    small as a real label budget allows."""
    split_seed: int = Field(0, ge=0)
    """Seed of the validation split and the labelled subset (keep it across stages)."""
    label_fraction: float | None = Field(None, gt=0, le=1)
    """Labelled subset: this fraction of the training examples, stratified by class."""
    labels_per_class: int | None = Field(None, ge=1)
    """Labelled subset: this many training examples per class."""

    @model_validator(mode="after")
    def _one_label_budget(self) -> DataSection:
        if self.label_fraction is not None and self.labels_per_class is not None:
            raise _conflict(("label_fraction", "labels_per_class"), "set at most one of the two label budgets")
        return self


class _BuilderSection(_Section):
    name: str
    options: dict[str, Any] = {}
    """The builder's keyword-only options, defaults filled in (flat beside `name` in YAML)."""

    @model_serializer
    def _flat(self) -> dict[str, Any]:
        # Written as the user writes it: options beside the name, not nested.
        return {"name": self.name, **self.options}


class ModelSection(_BuilderSection):
    """The model: a MODELS name plus that builder's keyword-only options."""

    name: str = "mlp_autoencoder"
    """Model from the MODELS registry, or `package.module:builder`."""


class ObjectiveSection(_BuilderSection):
    """The training loss: an OBJECTIVES name plus that builder's keyword-only options."""

    name: str = "auto"
    """Objective from OBJECTIVES; auto: reconstruction for autoencoders, supervised for classifiers."""


class InitSection(_Section):
    """Weights to start from (finetuning)."""

    checkpoint: str | None = None
    """Checkpoint directory, run directory or foreign weights file; null trains from scratch."""
    strict: bool = True
    """Fail unless every encoder key of the model is loaded; false loads what matches and reports the rest."""
    prefix_map: dict[str, str] = {}
    """Renames of foreign key prefixes, e.g. {'backbone.': 'encoder.'}."""
    load_head: bool = False
    """Also load the head's weights when their shapes match (same classes)."""


class FinetuneSection(_Section):
    """What trains during finetuning."""

    mode: Literal["full", "linear_probe"] = "full"
    """full: train all but `freeze`; linear_probe: freeze the encoder, train the head."""
    freeze: list[str] = []
    """Parameter name patterns (fnmatch) to freeze, e.g. 'encoder.*'."""
    unfreeze_at_step: int | None = Field(None, ge=1)
    """Unfreeze everything from this step on (gradual unfreezing)."""
    precompute_features: bool = True
    """linear_probe without unfreeze_at_step or unlabelled: run the frozen encoder once over the labelled subset
    and val (eval mode, no augmentation) and train the head on those features; false: run it every step, with
    the objective's augmentation."""
    head_lr: float | None = Field(None, gt=0)
    """Learning rate of the head (default: optim.lr)."""
    layer_decay: float | None = Field(None, gt=0, le=1)
    """Layer-wise lr decay: encoder layer l of L trains at lr * layer_decay ** (L - l)."""
    unlabelled: Literal["none", "fixmatch", "pseudo_label"] = "none"
    """Also learn from the train split's unlabelled examples: fixmatch (confident predictions on a weak view
    are the targets on a strong view), pseudo_label (the same on the weak view), or none."""
    unlabelled_ratio: int = Field(7, ge=1)
    """Unlabelled examples per labelled one in a training batch (FixMatch's mu)."""
    confidence_threshold: Annotated[float, Field(gt=0, le=1)] | Literal["adaptive"] = 0.95
    """An unlabelled example trains only where the model's largest class probability reaches this; adaptive:
    FreeMatch's per-class thresholds, which follow the model's own running confidence (start low, rise)."""
    unlabelled_weight: float = Field(1.0, ge=0)
    """Weight of the unlabelled loss beside the supervised one (FixMatch's lambda)."""
    distribution_alignment: bool = False
    """Rescale pseudo-label distributions so their running mean matches the labelled subset's class
    frequencies (ReMixMatch): a class the model under-predicts is not starved of pseudo-labels. Like the
    threshold, it has no effect with unlabelled: none, so a recipe's config can switch that alone."""

    @model_validator(mode="after")
    def _consistent_freezing(self) -> FinetuneSection:
        if self.mode == "linear_probe" and self.freeze:
            raise _conflict(("mode", "freeze"), "linear_probe already freezes the whole encoder; leave freeze empty")
        if self.unfreeze_at_step is not None and self.mode == "full" and not self.freeze:
            raise _conflict(("unfreeze_at_step", "freeze"),
                            "nothing is frozen to unfreeze (mode full, freeze empty); set freeze or mode linear_probe")
        if self.unlabelled != "none" and self.unlabelled_weight == 0:
            raise _conflict(("unlabelled", "unlabelled_weight"),
                            f"{self.unlabelled} with weight 0 learns nothing from unlabelled data; "
                            "set unlabelled_weight > 0 or unlabelled: none")
        return self


_Beta = Annotated[float, Field(ge=0, lt=1)]


class OptimSection(_Section):
    """The optimizer."""

    name: str = "adam"
    """Optimizer from the OPTIMIZERS registry: sgd, adam, adamw."""
    lr: float = Field(1e-3, gt=0)
    """Base learning rate (after warmup)."""
    weight_decay: float = Field(0.0, ge=0)
    """Weight decay (L2 for sgd and adam, decoupled for adamw)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD momentum."""
    nesterov: bool = False
    """SGD: Nesterov momentum."""
    betas: tuple[_Beta, _Beta] = (0.9, 0.999)
    """Adam and AdamW: decay rates of the gradient's first and second moments."""


class ScheduleSection(_Section):
    """The learning-rate schedule, per optimizer step."""

    name: str = "constant"
    """Schedule from the SCHEDULES registry: constant, cosine, step."""
    warmup_steps: int = Field(0, ge=0)
    """Steps of linear warmup from lr / warmup_steps to lr."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """cosine: final lr as a fraction of lr."""
    step_size: int = Field(1000, ge=1)
    """step: steps between decays."""
    gamma: float = Field(0.1, gt=0, le=1)
    """step: factor applied to the lr every step_size steps."""


def _jsonl_first(names: list[str]) -> list[str]:
    # metrics.jsonl is what inspect, report and resume read: always written, so the resolved config says so.
    return ["jsonl", *dict.fromkeys(name for name in names if name != "jsonl")]


class TrainSection(_Section):
    """The training loop."""

    epochs: int | None = Field(None, ge=1)
    """Length in passes over the training data (set this or max_steps)."""
    max_steps: int | None = Field(None, ge=1)
    """Length in optimizer steps (set this or epochs)."""
    device: Annotated[str, AfterValidator(_device)] = "auto"
    """auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision; fp16 also scales the loss."""
    grad_clip: float | None = Field(None, gt=0)
    """Clip the gradients' global norm to this value."""
    ema_decay: float | None = Field(None, gt=0, lt=1)
    """Keep an exponential moving average of the weights, updated after every optimizer step with this decay
    (e.g. 0.999); validation, best selection and the saved model.safetensors use the average. null: off."""
    accumulate: int = Field(1, ge=1)
    """Batches whose gradients add up to one optimizer step."""
    compile: bool = False
    """Compile the model with torch.compile."""
    grad_checkpointing: bool = False
    """Recompute the encoder's activations block by block in the backward pass instead of keeping them:
    activation memory of about one block, for roughly a third more compute (torchvision: and timm: backbones;
    batch norm's running statistics still move once per step)."""
    eval_every_steps: int | None = Field(None, ge=1)
    """Validate every this many steps (default: once per epoch) and at the end."""
    log_every_steps: int = Field(50, ge=1)
    """Log the training loss every this many steps."""
    loggers: Annotated[list[Literal["jsonl", "tensorboard", "csv"]], AfterValidator(_jsonl_first)] = ["jsonl"]
    """Where each record of metrics goes: jsonl (RUN_DIR/metrics.jsonl, always written, listed or not),
    tensorboard (RUN_DIR/tensorboard/, needs pip install 'ptft[tensorboard]'), csv (RUN_DIR/metrics.csv)."""
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop after this many evaluations without a new best checkpoint.monitor."""
    knn_monitor: bool = False
    """Also log val/knn_acc at every validation: k-NN accuracy (k=20) of the encoder's validation features
    against the labelled train examples'; usable as checkpoint.monitor to pick a label-free pretraining."""
    deterministic: bool = False
    """Bitwise-repeatable runs on a GPU: deterministic algorithms only (an error names any op that has none),
    no cuDNN autotuning, no TF32. Costs speed, how much depends on the model (deterministic convolution
    and scatter kernels are the slow ones). CPU runs are repeatable either way."""
    tf32: bool | None = None
    """TF32 matmuls and convolutions on CUDA (Ampere and newer): float32 inputs rounded to a 10-bit
    mantissa, for up to 8x the float32 matmul throughput. null: on, unless deterministic is true."""
    dist_timeout_s: int = Field(7200, ge=1)
    """Under torchrun: seconds a rank waits for the others at a collective before the job fails. Generous,
    because rank 0 alone validates, evaluates and writes checkpoints while the others wait."""

    @model_validator(mode="after")
    def _one_length(self) -> TrainSection:
        if (self.epochs is None) == (self.max_steps is None):
            got = "neither" if self.epochs is None else "both"
            raise _conflict(("epochs", "max_steps"), f"set exactly one of the two; got {got}")
        return self

    @model_validator(mode="after")
    def _repeatable_without_tf32(self) -> TrainSection:
        if self.deterministic and self.tf32:
            raise _conflict(("deterministic", "tf32"), "deterministic runs use full float32 matmuls, the same "
                                                       "figures on every GPU; set tf32 false or leave it null")
        return self


class CheckpointSection(_Section):
    """When checkpoints are saved and which one is best."""

    every_steps: int | None = Field(None, ge=1)
    """Save every this many steps (default: at every evaluation)."""
    keep_last: int = Field(2, ge=1)
    """Step checkpoints kept besides best."""
    monitor: str = "val/loss"
    """Validation metric that decides the best checkpoint."""
    mode: Literal["min", "max"] | None = None
    """Whether a smaller or a larger monitor is better; null: from its name (acc, f1, psnr: max; loss, mse: min)."""

    @model_validator(mode="before")
    @classmethod
    def _mode_from_monitor(cls, values: Any) -> Any:
        # Filled in before validation, so the resolved config (and config.yaml) shows the mode used.
        if not isinstance(values, dict) or values.get("mode") is not None:
            return values
        monitor = values.get("monitor", cls.model_fields["monitor"].default)
        if not isinstance(monitor, str):
            return values  # the field's own check names the wrong type
        mode = metric_mode(monitor)
        if mode is None:
            raise _conflict(("mode",), f"required for monitor {monitor!r}, whose direction ptft does not know: "
                                       f"min if smaller is better, max if larger is")
        return {**values, "mode": mode}

    @model_validator(mode="after")
    def _mode_fits_monitor(self) -> CheckpointSection:
        known = metric_mode(self.monitor)
        if known is not None and self.mode != known:
            better = "larger" if known == "max" else "smaller"
            raise _conflict(("mode", "monitor"), (
                f"mode {self.mode!r} would keep the worst checkpoint: a {better} {self.monitor} is better; "
                f"set mode: {known} or leave mode out"))
        return self


class Config(BaseModel):
    """A validated, resolved config; build changed copies with `model_copy(update=...)`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: RunSection
    data: DataSection
    model: ModelSection
    objective: ObjectiveSection
    init: InitSection
    finetune: FinetuneSection
    optim: OptimSection
    schedule: ScheduleSection
    train: TrainSection
    checkpoint: CheckpointSection


BUILDER_SECTIONS: dict[str, type[_BuilderSection]] = {"model": ModelSection, "objective": ObjectiveSection}
