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
- ``objective(cfg, model, sampler)`` — the `sonocl.methods.objectives.Objective` of one step (``sampler``: the
  training sampler, for what depends on the data, e.g. MoCo's queue size);
- ``head`` (optional) — ``head(cfg, feature_dim)`` builds the method's own head on the pooled features, which the
  model carries in place of the `ProjectionHead` of ``cfg.model`` (DINO's);
- ``meta_sampler`` (optional) — a `MetaBatches` of held-out batches the objective reads each step (Meta-USCL);
- ``validation_sampler`` (optional) — the held-out pairs of the validation loss (USCL: unmixed, as its reference);
- ``uses_labels(cfg)`` — whether training reads any class or anatomy label (the evaluation's leak guard);
- ``learns_pair_weights`` — whether the objective learns a weight per pair (Meta-USCL's CMW-Net), which its
  checkpoints hold and the report shows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sonocl.methods.config import Options, PretrainConfig

if TYPE_CHECKING:
    import numpy as np

    from sonocl.data.store import VideoTable
    from sonocl.methods.objectives import Objective
    from sonocl.models import ContrastiveModel, Head
    from sonocl.pairs import PairBatch, PairSampler


class MetaBatches(Protocol):
    """What a method's ``meta_sampler`` builds: a fresh held-out batch for each training step."""

    def batch(self, epoch: int, step: int) -> PairBatch: ...


SamplerFactory = Callable[["PretrainConfig", "VideoTable", "np.ndarray", int, int, int], "PairSampler"]
MetaSamplerFactory = Callable[["PretrainConfig", "VideoTable", "np.ndarray", int, int, int], MetaBatches]
ObjectiveFactory = Callable[["PretrainConfig", "ContrastiveModel", "PairSampler"], "Objective"]
HeadFactory = Callable[["PretrainConfig", int], "Head"]


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
    head: HeadFactory | None = None
    """The method's own head on features of the given size (None: the `ProjectionHead` of ``cfg.model``)."""
    meta_sampler: MetaSamplerFactory | None = None
    validation_sampler: SamplerFactory | None = None
    """Held-out pairs for the validation loss and model selection (None: the training sampler's pairs)."""
    uses_labels: Callable[[PretrainConfig], bool] = lambda cfg: False
    learns_pair_weights: bool = False

    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.options)]
