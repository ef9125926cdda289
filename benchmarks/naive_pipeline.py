"""The USCL reference data path, rebuilt as the baseline for `pair_throughput.py`.

As in ``983632847/USCL`` (``train_USCL/data_aug/dataset_wrapper_Ultrasound_Video_Mixup.py``, docs/methods.md
§1.3–1.4): frames are JPEG files in one folder per video; each item opens its video's folder, draws three
frames with ``random.sample``, decodes them with PIL (grey copied to RGB), runs the per-sample torchvision
pipeline Resize → RandomResizedCrop(0.8–1, 0.8–1.25) → HorizontalFlip → ColorJitter(0.8, 0.8, 0.8, 0.2) →
ToTensor → Normalize(0.5, 0.25) on each, and mixes them with one λ ~ Beta(0.5, 0.5) in ``__getitem__``;
a DataLoader with worker processes batches the pairs.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from sonocl.data.store import FrameStore


def dump_jpeg_folders(store: FrameStore, videos: np.ndarray, root: Path) -> Path:
    """Write the frames of ``videos`` as ``root/<video>/<video>_frame<k>.jpg`` (quality 95), the reference layout."""
    root.mkdir(parents=True, exist_ok=True)
    for v in videos:
        name = f"video{int(v):04d}"
        folder = root / name
        folder.mkdir(exist_ok=True)
        for k, frame in enumerate(store.video_frames(int(v))):
            Image.fromarray(frame).save(folder / f"{name}_frame{k}.jpg", quality=95)
    return root


def uscl_transform(size: int) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.Resize((size, size)),
            transforms.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.8, 1.25)),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(0.8, 0.8, 0.8, 0.2),
            transforms.ToTensor(),
            transforms.Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25]),
        ]
    )


class NaiveVideoMixupDataset(torch.utils.data.Dataset):
    """One item = one video folder; three decoded, augmented and mixed frames → the positive pair."""

    def __init__(self, root: Path, size: int) -> None:
        self.folders = sorted(str(p) for p in Path(root).iterdir() if p.is_dir())
        self.transform = uscl_transform(size)

    def __len__(self) -> int:
        return len(self.folders)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        folder = self.folders[index]
        paths = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".jpg")]
        f1, f2, f3 = (self.transform(Image.open(p).convert("RGB")) for p in random.sample(paths, 3))
        lam = np.random.beta(0.5, 0.5)
        return lam * f1 + (1 - lam) * f2, lam * f3 + (1 - lam) * f2


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def naive_loader(
    root: Path, size: int, batch_size: int = 32, workers: int = 2, num_samples: int = 10**6
) -> torch.utils.data.DataLoader:
    """Shuffled video items drawn with replacement (one long epoch, so no epoch restarts are timed)."""
    dataset = NaiveVideoMixupDataset(root, size)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=num_samples),
        drop_last=True,
        num_workers=workers,
        worker_init_fn=_seed_worker,
    )
