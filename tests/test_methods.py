"""The method registry: every method's preset, CLI flags, sampler and objective agree, option by option.

One option, one name, one default: each option of a method's options dataclass has a ``sonocl pretrain`` flag of
the same name, the preset's value is the dataclass default, and a value given on the command line reaches the
part that uses it (the sampler or the objective). A new option must be added to `REACHES` below, or this fails.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from sonocl.methods import get_method, method_names, registry
from sonocl.models import ContrastiveModel
from sonocl.train.cli import add_arguments, resolve_config

METHOD_NAMES = method_names()

# option → (a value other than every method's default, where the built part shows it)
REACHES = {
    "temperature": (0.3, lambda sampler, objective: objective.info_nce.temperature),
    "items": ("frames", lambda sampler, objective: sampler.items),
    "semi_weight": (0.5, lambda sampler, objective: objective.semi_weight),
    "label_rate": (0.5, lambda sampler, objective: len(sampler.labelled_videos) / 8),
    "max_dist": (7, lambda sampler, objective: sampler.max_dist),
    "meta_every": (3, lambda sampler, objective: objective.meta_every),
    "meta_batch_size": (6, None),  # the meta sampler's batch (checked in test_meta_set_follows_its_options)
    "meta_frame": ("first", None),
    "cmw_lr": (1e-3, lambda sampler, objective: objective.cmw_optimizer.param_groups[0]["lr"]),
    "cmw_hidden": (5, lambda sampler, objective: objective.cmw.net[0].out_features),
    "inner_lr": (0.05, lambda sampler, objective: objective.inner_lr),
    "delta_t": (0.5, lambda sampler, objective: sampler.delta_t),
    "base_temperature": (0.2, lambda sampler, objective: objective.info_nce.base_temperature),
    "anatomy_column": ("zone", lambda sampler, objective: sampler.label_columns[0]),
    "anatomy_level": ("coarse", None),  # with coarse_column: which column the classes come from
    "coarse_column": ("zone_coarse", lambda sampler, objective: sampler.label_columns[0]),
    "anatomy_ratio": (0.0, lambda sampler, objective: len(sampler.labelled_videos)),
    "queue_size": (16, lambda sampler, objective: objective.queue.shape[0]),
    "loss": ("symmetric", lambda sampler, objective: objective.loss),
    "shuffle_bn_groups": (3, lambda sampler, objective: objective.shuffle_bn_groups),
    "objective": ("vicreg", lambda sampler, objective: getattr(objective, "name", "simclr")),
    "pair_weights": ("uniform", lambda sampler, objective: sampler.pair_weights),
    "vicreg_lambda": (3.0, None),  # reach checked with --objective vicreg in tests/test_ivpp_objectives.py
    "vicreg_mu": (4.0, None),
    "vicreg_nu": (0.5, None),
    "barlow_lambda": (0.1, None),
    "mask_ratio": (0.5, lambda sampler, objective: objective.mask_ratio),
    "pixel_target": ("plain", lambda sampler, objective: objective.pixel_target),
    "decoder_dim": (64, lambda sampler, objective: objective.decoder.embed.out_features),
    "decoder_depth": (3, lambda sampler, objective: len(objective.decoder.blocks)),
    "decoder_heads": (2, lambda sampler, objective: objective.decoder.blocks[0].attn.num_heads),
    "views": ("video", lambda sampler, objective: {1: "image", 2: "video"}[sampler.k]),
    "out_dim": (256, lambda sampler, objective: objective.loss.center.shape[1]),
    "last_layer_norm": ("learnt", None),  # the head's (the model's): checked in tests/test_dino.py
    "student_temperature": (0.2, lambda sampler, objective: objective.loss.student_temperature),
    "teacher_temperature": (0.07, lambda sampler, objective: objective.teacher_temperatures[1]),
    "warmup_teacher_temperature": (0.02, lambda sampler, objective: objective.teacher_temperatures[0]),
    "teacher_warmup": (0.3, lambda sampler, objective: objective.teacher_warmup),
    "center_momentum": (0.8, lambda sampler, objective: objective.loss.center_momentum),
    "freeze_last_layer": (0.05, lambda sampler, objective: objective.freeze_last_layer),
}


def _config(method: str, *argv: str):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return resolve_config(parser.parse_args(["--store", "S", "--method", method, "--out", "R", *argv]))


def _model(cfg) -> ContrastiveModel:
    """A small model with the heads the run builds: a method's own head (DINO's) as `Method.head` builds it."""
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU())
    head = get_method(cfg.method).head
    small = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, projection_hidden=6, projection_dim=4))
    return ContrastiveModel(
        backbone,
        8,
        projection_hidden=6,
        projection_dim=4,
        num_classes=3 if cfg.model.classifier else 0,
        predictor_hidden=5 if cfg.model.predictor_hidden else 0,
        projector=head(small, 8) if head is not None else None,
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from sonocl.data.store import FrameStore
    from sonocl.data.store_writer import FrameStoreWriter

    path = tmp_path_factory.mktemp("methods") / "store"
    with FrameStoreWriter(path, size=8) as writer:
        for v in range(8):
            writer.add_video(
                [np.full((8, 8), v * 9 + i, dtype=np.uint8) for i in range(12)],
                id=f"v{v}",
                source=f"v{v}.mp4",
                label=("a", "b")[v % 2],
                group=f"p{v}",
                fps=10.0,
                original_size=(8, 8),
                crop_box=(0, 0, 8, 8),
                content_hash=f"h{v}",
                timestamps=[i / 10 for i in range(12)],
                extra_labels={"anatomy": "L", "zone": ("R1", "R2")[v % 2], "zone_coarse": "R"},
            )
    return FrameStore.open(path)


def test_registry_names_modules_and_cli_choices() -> None:
    assert tuple(registry()) == METHOD_NAMES
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    method_action = next(a for a in parser._actions if a.dest == "method")
    assert tuple(method_action.choices) == METHOD_NAMES
    with pytest.raises(ValueError, match="unknown method 'swav'"):
        get_method("swav")


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_preset_options_are_the_dataclass_defaults_and_cite_a_paper(name: str) -> None:
    method = get_method(name)
    cfg = method.preset()
    assert cfg.method == name and type(cfg.options) is method.options
    assert cfg.options == method.options(), "a preset must not restate or override its options' defaults"
    assert method.paper and method.summary
    for option in dataclasses.fields(method.options):
        assert option.metadata.get("help"), f"{name}.{option.name} has no help text"


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_option_flag_reaches_the_part_that_uses_it(name: str, store) -> None:
    method = get_method(name)
    unchecked = sorted(set(method.option_names()) - set(REACHES))
    assert not unchecked, f"add {unchecked} to REACHES"
    for option in method.option_names():
        value, reach = REACHES[option]
        extra = ["--anatomy-level", "coarse"] if option == "coarse_column" else []
        cfg = _config(name, f"--{option.replace('_', '-')}", str(value), *extra)
        assert getattr(cfg.options, option) == value, f"--{option} did not set options.{option}"
        if reach is None:
            continue
        cfg = dataclasses.replace(cfg, store=str(store.root))
        sampler = method.sampler(cfg, store, np.arange(store.num_videos), 2, 0, 1)
        objective = method.objective(cfg, _model(cfg), sampler)
        assert reach(sampler, objective) == pytest.approx(value), f"{name}: --{option} {value} did not reach the part"


def test_an_option_of_another_method_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"options\.max_dist \(max_dist is an option of meta-uscl\)"):
        _config("uscl", "--max-dist", "4")


def test_meta_set_follows_its_options(store) -> None:
    method = get_method("meta-uscl")
    cfg = _config("meta-uscl", "--meta-batch-size", "6", "--meta-frame", "first")
    meta = method.meta_sampler(cfg, store, np.arange(4), cfg.batch_size, 0, 1)
    batch = meta.batch(0, 0)
    assert len(batch) == 6 and np.all(batch.frames[:, 0] == store.video_offsets[batch.video])


def test_disagreeing_defaults_were_settled_by_the_papers() -> None:
    """USCL's λ is 0.2 (its code default) and MoCo v2's key momentum 0.999 (the paper's m), each stated once."""
    assert get_method("uscl").options().semi_weight == 0.2
    moco = get_method("moco")
    cfg = moco.preset()
    assert cfg.schedule.ema_start == 0.999
    objective = moco.objective(cfg, _model(cfg), SimpleNamespace(num_items=18_000))
    assert objective.momentum == 0.999
    assert objective.queue.shape[0] == 1800  # MoCo's queue: 10 % of the training items unless set


def test_a_new_method_is_one_module(tmp_path: Path, monkeypatch, store) -> None:
    """The worked example of docs/internals.md: a method in one file, registered, trained by the loop."""
    import sys

    from sonocl import methods

    source = Path(__file__).resolve().parents[1] / "docs" / "internals.md"
    text = source.read_text()
    code = text.split("```python\n# src/sonocl/methods/adjacent.py\n", 1)[1].split("```", 1)[0]
    module_path = tmp_path / "adjacent.py"
    module_path.write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    module = importlib.import_module("adjacent")
    monkeypatch.setitem(sys.modules, "sonocl.methods.adjacent", module)
    monkeypatch.setattr(methods, "_MODULES", (*methods._MODULES, "adjacent"))
    monkeypatch.setattr(methods, "_REGISTRY", {})
    from sonocl.train.config import preset

    cfg = preset("adjacent")
    assert cfg.method == "adjacent" and cfg.options.gap == 1
    assert _config("adjacent", "--gap", "3").options.gap == 3  # its option is a flag of its own
    model = _model(cfg)
    method = methods.get_method("adjacent")
    sampler = method.sampler(cfg, store, np.arange(store.num_videos), 4, 0, 1)
    batch_of_pairs = sampler.batches(0)[0]
    assert np.all(batch_of_pairs.frames[:, 1] - batch_of_pairs.frames[:, 0] <= 1)
    objective = method.objective(cfg, model, sampler)
    views = torch.randn(4, 16), torch.randn(4, 16)
    from sonocl.methods.objectives import BatchTensors, StepContext

    batch = BatchTensors(torch.arange(4), torch.ones(4), torch.full((4,), -1))
    loss, parts = objective(model, *views, batch, StepContext(0, torch.optim.SGD(model.parameters(), lr=0.1), 0.1))
    assert torch.isfinite(loss) and "contrastive" in parts


def test_byol_preset_has_the_papers_two_pipelines_and_they_can_be_set() -> None:
    """Grill et al. 2020, Table 6: blur p 1.0 / 0.1 and solarisation p 0.0 / 0.2 on the first / second view."""
    from sonocl.train.config import merge, parse_assignment, preset

    augment = preset("byol").augment
    assert (augment.blur_p, augment.view2_blur_p, augment.solarize_p, augment.view2_solarize_p) == (1.0, 0.1, 0.0, 0.2)
    changed = merge(preset("simclr"), parse_assignment("augment.view2_blur_p=0.3")).augment
    assert changed.view2_blur_p == 0.3 and changed.view2_solarize_p is None


def test_a_method_reads_its_own_options_typed_and_refuses_another_methods() -> None:
    from sonocl.errors import ConfigError
    from sonocl.methods.config import options_of
    from sonocl.methods.uscl import USCLOptions
    from sonocl.train.config import preset

    assert options_of(preset("uscl"), USCLOptions).semi_weight == 0.2
    with pytest.raises(ConfigError, match="simclr: options are Options, not USCLOptions"):
        options_of(preset("simclr"), USCLOptions)
