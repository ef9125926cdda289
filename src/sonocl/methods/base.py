"""What a pretraining method is: a name, a paper, a preset, an options dataclass, a pair sampler and an objective.

Every method module (``sonocl/methods/<name>.py``) defines one `Method` and nothing else that another method
uses; the registry (``sonocl.methods``) maps names to them. The training loop, the CLI and the report ask the
method, never ``if method == …``:

- ``preset()`` — the full `PretrainConfig` of the paper's recipe (the options dataclass holds the method's own
  defaults, once);
- ``options`` — the dataclass of the method's own options; each field's ``metadata["help"]`` becomes a
  ``sonocl pretrain`` flag (``semi_weight`` → ``--semi-weight``) and its ``__post_init__`` checks the values;
- ``sampler(cfg, store, videos, batch_size, rank, world_size)`` — the `sonocl.pairs.PairSampler` of the
  training videos;
- ``objective(cfg, model, sampler)`` — the `sonocl.train.objectives.Objective` of one step (``sampler``: the
  training sampler, for what depends on the data, e.g. MoCo's queue size);
- ``meta_sampler`` (optional) — a sampler of held-out batches the objective reads each step (Meta-USCL);
- ``validation_sampler`` (optional) — the held-out pairs of the validation loss (USCL: unmixed, as its reference);
- ``uses_labels(cfg)`` — whether training reads any class or anatomy label (the evaluation's leak guard).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sonocl.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from sonocl.data.store import FrameStore
    from sonocl.pairs import PairSampler
    from sonocl.train.config import PretrainConfig
    from sonocl.train.objectives import Objective


def option(default: Any, help: str) -> Any:
    """A method option: its one default and the help text of its ``sonocl pretrain`` flag."""
    return field(default=default, metadata={"help": help})


ITEM_KINDS = ("videos", "frames")


@dataclass
class Options:
    """Options every method has. Subclasses add the method's own, each with `option` and a check in `check`."""

    temperature: float = option(0.5, "softmax temperature τ of the InfoNCE loss (and of the validation loss)")
    items: str | None = option(None, "what one sampler item is: videos or frames (default: the method's own)")

    def __post_init__(self) -> None:
        problems = self.check()
        if problems:
            raise ConfigError("; ".join(problems))

    def check(self) -> list[str]:
        """The problems of these values, each naming its key (empty when they can run)."""
        problems = []
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0, not {self.temperature}")
        if self.items is not None and self.items not in ITEM_KINDS:
            problems.append(f"items must be one of {', '.join(ITEM_KINDS)}, not {self.items!r}")
        return problems


def fraction_problem(name: str, value: float) -> list[str]:
    """``[message]`` when ``value`` is outside [0, 1], else ``[]``."""
    return [] if 0.0 <= value <= 1.0 else [f"{name} must lie in [0, 1], not {value}"]


SamplerFactory = Callable[["PretrainConfig", "FrameStore", "np.ndarray", int, int, int], "PairSampler"]
ObjectiveFactory = Callable[["PretrainConfig", "nn.Module", "PairSampler"], "Objective"]


@dataclass(frozen=True)
class Method:
    """One pretraining method (see the module docstring)."""

    name: str
    summary: str
    """One line for ``sonocl pretrain --help``."""
    paper: str
    """The citation of the recipe the preset follows."""
    options: type[Options]
    preset: Callable[[], PretrainConfig]
    sampler: SamplerFactory
    objective: ObjectiveFactory
    meta_sampler: SamplerFactory | None = None
    validation_sampler: SamplerFactory | None = None
    """Held-out pairs for the validation loss and model selection (None: the training sampler's pairs)."""
    uses_labels: Callable[[PretrainConfig], bool] = lambda cfg: False

    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.options)]
