"""The settings of `sonocl segment`: one `SegmentConfig`, checked when it is built.

Every field is the command-line option of the same name (`sonocl.evaluate.segment.add_arguments`), every default
lives here once; a bad value raises `sonocl.errors.ConfigError` naming the option, before any image is read.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any

from sonocl.backbones import name_problem
from sonocl.errors import ConfigError
from sonocl.evaluate.inits import default_label
from sonocl.options import number_rule
from sonocl.runtime import resolve_device

MASK_CLASSES = ("auto", "binary", "indexed")
"""How mask values are read (`sonocl.evaluate.masks.mask_task`)."""
DEFAULT_MEAN, DEFAULT_STD = 0.5, 0.25
"""The normalisation of [0, 1] pixels of an init whose file records none."""


def _option(field: str) -> str:
    """The command-line flag of a `SegmentConfig` field (one name from flag to field)."""
    return "--" + field.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class SegmentConfig:
    """Everything that defines a segmentation run; every field is the command-line option of the same name.

    Checked when built: a bad value raises `sonocl.errors.ConfigError` naming the option, before any image is read.
    """

    images: Path
    init: tuple[str, ...]
    """random | imagenet | a sonocl run directory, checkpoint or encoder.safetensors | a USCL/Meta-USCL file."""
    out: Path
    masks: Path | None = None
    """The mask root (default: ``images``)."""
    mask_classes: str = "auto"
    """auto | binary | indexed: how mask values are read (`sonocl.evaluate.masks.mask_task`)."""
    class_names: tuple[str, ...] | None = None
    """The foreground classes' names, in the order of their mask values 1..K (default: class1..classK)."""
    class_masks: tuple[str, ...] | None = None
    """One mask folder per class, ``NAME=FOLDER`` each (`sonocl.evaluate.masks.pair_class_folders`), instead of
    ``masks``: class k is the k-th, named NAME, a later class winning where two masks overlap."""
    group_regex: str | None = None
    pixel_size: Path | None = None
    skip_bad_masks: bool = False
    name: tuple[str, ...] | None = None
    """Table label of each init (default: derived from the init)."""
    backbone: str | None = None
    """Backbone of every init (`sonocl.backbones`: a ResNet or ``timm:NAME``); None: a sonocl encoder's own (the
    backbone it records), anything else a resnet18."""
    channels: int = 1
    freeze_encoder: bool = False
    mean: float | None = None
    """Normalisation of [0, 1] pixels (default: the encoder file's, else ``DEFAULT_MEAN``)."""
    std: float | None = None
    folds: int = 5
    size: int = 128
    epochs: int = 8
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"
    postprocess: bool | None = None
    """Keep the largest predicted component, holes filled, before scoring; None: on when head circumferences are given."""
    threshold: float | None = None
    """Foreground probability threshold; None: calibrated per fold on the training images (`calibrate_threshold`)."""
    jobs: int = 1
    overlays: int = 6
    overwrite: bool = False
    """Write into an --out that sonocl did not make (`sonocl.outputs`)."""

    def __post_init__(self) -> None:
        for field in ("images", "out", "masks", "pixel_size"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, field, Path(value))
        for field in ("init", "name", "class_names", "class_masks"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, field, tuple(value))
        problems = [f"{_option(field)} {getattr(self, field)!r}: {rule}" for field, rule in self._failed_rules()]
        try:
            resolve_device(self.device)  # the one check of --device, whose message names it
        except ConfigError as error:
            problems.append(str(error))
        if problems:
            raise ConfigError("; ".join(problems))

    def _failed_rules(self) -> list[tuple[str, str]]:
        rules = {
            "size": (self.size >= 32, "must be ≥ 32 (the encoder halves it five times)"),
            "epochs": (self.epochs >= 1, "must be ≥ 1"),
            "batch_size": (self.batch_size >= 2, "must be ≥ 2 (BatchNorm needs two images a batch)"),
            "folds": (self.folds >= 2, "must be ≥ 2"),
            "seed": (self.seed >= 0, "must be ≥ 0"),
            "lr": (number_rule(self.lr, above=0) is None, "must be > 0 and finite"),
            "weight_decay": (number_rule(self.weight_decay, at_least=0) is None, "must be ≥ 0 and finite"),
            "mean": (self.mean is None or number_rule(self.mean) is None, "must be finite"),
            "std": (self.std is None or number_rule(self.std, above=0) is None, "must be > 0 and finite"),
            "threshold": (self.threshold is None or 0 < self.threshold < 1, "must be in (0, 1)"),
            "channels": (self.channels in (1, 3), "must be 1 or 3"),
            "backbone": (
                self.backbone is None or not name_problem(self.backbone),
                name_problem(self.backbone) if self.backbone else "",
            ),
            "jobs": (self.jobs >= 1, "must be ≥ 1"),
            "overlays": (self.overlays >= 0, "must be ≥ 0"),
            "init": (len(self.init) >= 1, "give at least one init"),
            "images": (self.images.is_dir(), "not a directory"),
            "masks": (self.masks is None or self.masks.is_dir(), "not a directory"),
            "pixel_size": (self.pixel_size is None or self.pixel_size.is_file(), "no such file"),
            "mask_classes": (self.mask_classes in MASK_CLASSES, f"must be one of {', '.join(MASK_CLASSES)}"),
            "class_names": (
                self.class_names is None
                or (
                    all(re.fullmatch(r"[A-Za-z0-9_-]+", name) for name in self.class_names)
                    and len(set(self.class_names)) == len(self.class_names)
                ),
                "unique names of letters, digits, _ and - (they name the metrics' columns)",
            ),
        }
        failed = [(field, rule) for field, (ok, rule) in rules.items() if not ok]
        if self.name is not None and len(self.name) != len(self.init):
            failed.append(("name", f"{len(self.name)} names for {len(self.init)} --init; give one per init or none"))
        elif len(set(self.labels)) != len(self.labels):
            failed.append(("name", f"init labels {list(self.labels)} must be unique; give --name"))
        if self.class_masks is not None:
            failed += [("class_masks", rule) for rule in self._class_mask_problems()]
        if self.group_regex is not None:
            try:
                re.compile(self.group_regex)
            except re.error as error:
                failed.append(("group_regex", f"not a regular expression ({error})"))
        return failed

    def _class_mask_problems(self) -> list[str]:
        assert self.class_masks is not None
        entries = [entry.partition("=") for entry in self.class_masks]
        names = [name for name, _, _ in entries]
        problems = [f"{entry!r} is not NAME=FOLDER" for entry, (_, sep, _) in zip(self.class_masks, entries) if not sep]
        problems += [f"{folder}: not a directory" for _, sep, folder in entries if sep and not Path(folder).is_dir()]
        if len(set(names)) != len(names) or not all(re.fullmatch(r"[A-Za-z0-9_-]+", name) for name in names):
            problems.append("class names must be unique, of letters, digits, _ and -")
        if self.masks is not None or self.class_names is not None or self.mask_classes == "indexed":
            problems.append("one folder per class replaces --masks, --class-names and --mask-classes indexed")
        return problems

    @property
    def class_folders(self) -> list[tuple[str, Path]]:
        """``class_masks`` as (name, folder) pairs."""
        return [(name, Path(folder)) for name, _, folder in (e.partition("=") for e in self.class_masks or ())]

    @property
    def labels(self) -> tuple[str, ...]:
        """The table label of each init."""
        return self.name if self.name is not None else tuple(default_label(spec) for spec in self.init)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SegmentConfig:
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (paths as strings, tuples as lists)."""

        def plain(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            return list(value) if isinstance(value, tuple) else value

        return {field.name: plain(getattr(self, field.name)) for field in dataclasses.fields(self)}
