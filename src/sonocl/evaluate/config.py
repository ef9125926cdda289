"""The settings of an evaluation (`EvalConfig`), the papers' fine-tuning recipes, protocols and selections.

``EvalConfig.from_recipe(recipe, **overrides)`` is the one way to build one: the recipe's values, then every override
given; the defaults of its fields are the Meta-USCL recipe's (`RECIPES`), never copies of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sonocl.errors import ConfigError
from sonocl.options import number_rule

PROTOCOLS = ("linear", "last-block", "full", "knn")


SELECTIONS = ("last", "inner-val", "max-test")


UNITS = ("video", "patient")
"""What a prediction is scored for: a video (its frames' mean probability) or a patient (the store's group: the mean
over its videos' frames), the unit of a label that belongs to the patient."""


def levels(unit: str) -> tuple[str, ...]:
    """The levels an evaluation scores, the headline (``unit``) last: frame and video, and patient for that unit."""
    return ("frame", "video", "patient") if unit == "patient" else ("frame", "video")


GROUP_BY = ("video", "group")
"""``group``: the store's group ids (patients, from DICOM PatientID or a CSV group column) stay in one fold."""


OPTIMISTIC = "optimistic (selected on the test fold)"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Optimisation and input settings of a fine-tuning recipe (Adam, cosine schedule over the epochs)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    size: int
    mean: float
    std: float


RECIPES: dict[str, Recipe] = {
    # USCL eval_pretrained_model.py (methods.md §1.8)
    "uscl": Recipe(epochs=100, batch_size=32, lr=0.01, weight_decay=1e-4, size=224, mean=0.5, std=0.25),
    # Meta-USCL eval_pretrained_model_on_POCUS/train.py (§2.9); 64 or 224 px
    "meta-uscl": Recipe(epochs=30, batch_size=128, lr=0.01, weight_decay=1e-4, size=64, mean=0.18, std=0.24),
}


@dataclasses.dataclass
class EvalConfig:
    """Everything that defines an evaluation besides the store and the inits (saved in results.json).

    Build it with `from_recipe`: the optimisation and input fields have no defaults of their own, so the recipe's
    values (`RECIPES`) are the only ones."""

    recipe: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    size: int
    mean: float
    std: float
    protocol: str = "last-block"
    channels: int = 1
    backbone: str = "resnet18"
    folds: int = 5
    seeds: int = 1
    seed: int = 0
    group_by: str = "video"
    fps: float = 3.0
    """Frame sampling rate from the store's timestamps; 0 = every frame."""
    frames_per_video: int = 30
    """At most this many sampled frames per video (the first ones); 0 = no limit."""
    selection: str = "last"
    test_every_epoch: bool = False
    """Predict the test fold after every epoch for the diagnostic curve (implied by ``selection="max-test"``)."""
    freeze_bn: bool = False
    knn_k: int = 20
    full_backbone_lr_scale: float = 0.1
    """``full``: the backbone's LR is this share of the head's (Adam 0.01 on every layer erases what pretraining
    brought; the 10× rule of fine-tuning practice). The papers' last-block protocol trains layer4[-1] at the head's."""
    linear_augment: bool = False
    inner_val_fraction: float = 0.2
    classes: tuple[str, ...] | None = None
    """The classes kept, in order; ``A+B`` merges labels, ``NAME=A+B`` names the merge (`evaluate.data.class_members`)."""
    label_column: str = "label"
    unit: str = "video"
    """`UNITS`: ``patient`` adds patient-level metrics, the headline of every table."""
    device: str = "auto"

    @classmethod
    def from_recipe(cls, recipe: str, **overrides: Any) -> EvalConfig:
        """The recipe's values, then every override that is not None."""
        if recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        values = dataclasses.asdict(RECIPES[recipe])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(recipe=recipe, **values)

    def __post_init__(self) -> None:
        checks = {
            f"protocol in {PROTOCOLS}": self.protocol in PROTOCOLS,
            f"selection in {SELECTIONS}": self.selection in SELECTIONS,
            f"group_by in {GROUP_BY}": self.group_by in GROUP_BY,
            f"unit in {UNITS}": self.unit in UNITS,
            "channels 1 or 3": self.channels in (1, 3),
            "0 < full_backbone_lr_scale ≤ 1": 0 < self.full_backbone_lr_scale <= 1,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ConfigError(f"invalid evaluation settings: {', '.join(failed)}")
        # Every number of the command line, named by its option: in range and finite, before any data is read.
        rules: dict[str, tuple[Any, dict[str, float]]] = {
            "folds": (self.folds, {"at_least": 2}),
            "seeds": (self.seeds, {"at_least": 1}),
            "seed": (self.seed, {"at_least": 0}),
            "epochs": (self.epochs, {"at_least": 1}),
            "batch_size": (self.batch_size, {"at_least": 2}),  # BatchNorm needs two images a batch
            "lr": (self.lr, {"above": 0}),
            "weight_decay": (self.weight_decay, {"at_least": 0}),
            "size": (self.size, {"at_least": 16}),
            "mean": (self.mean, {}),
            "std": (self.std, {"above": 0}),
            "fps": (self.fps, {"at_least": 0}),
            "frames_per_video": (self.frames_per_video, {"at_least": 0}),
            "knn_k": (self.knn_k, {"at_least": 1}),
            "inner_val_fraction": (self.inner_val_fraction, {"above": 0, "below": 1}),
        }
        problems = [
            f"--{name.replace('_', '-')} {value!r}: {problem}"
            for name, (value, bounds) in rules.items()
            if (problem := number_rule(value, **bounds))
        ]
        if problems:
            raise ConfigError("; ".join(problems))
        if self.unit == "patient" and self.group_by != "group":
            raise ConfigError(
                "--unit patient scores each patient, so its videos must stay in one fold: use --group-by group (or "
                "auto) on a store with patient groups (`sonocl ingest --group-column`, or DICOM PatientID)"
            )
        if self.protocol == "knn" and self.selection != "last":
            raise ConfigError("knn has no epochs to select: use --selection last")
