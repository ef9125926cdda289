"""U-Net shapes, joint augmentation, and a tiny end-to-end `sonocl segment` run on synthetic ellipse images."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sonocl.backbones import feature_channels
from sonocl.cli import main
from sonocl.errors import ConfigError
from sonocl.evaluate import segmentation_metrics as sm
from sonocl.evaluate.masks import MaskTask
from sonocl.evaluate.segment_config import SegmentConfig
from sonocl.evaluate.segment_data import SegmentData, SegmentDataError, image_groups, read_pixel_sizes
from sonocl.evaluate.segment_folds import THRESHOLDS, calibrate_threshold, dice_by_threshold
from sonocl.evaluate.unet import JointAugment, UNet, dice_bce_loss, segmentation_loss
from sonocl.models import build_backbone, save_encoder


@pytest.mark.parametrize(("arch", "channels"), [("resnet18", 1), ("resnet18", 3), ("resnet50", 1), ("resnet50", 3)])
def test_unet_output_shape(arch: str, channels: int) -> None:
    model = UNet(build_backbone(arch, channels)).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, channels, 64, 96))
    assert logits.shape == (1, 1, 64, 96)


def test_unet_skip_widths_and_odd_sizes() -> None:
    assert feature_channels(build_backbone("resnet18", 1)) == [64, 64, 128, 256, 512]
    assert feature_channels(build_backbone("resnet50", 1)) == [64, 256, 512, 1024, 2048]
    model = UNet(build_backbone("resnet18", 1)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 40, 56)).shape == (2, 1, 40, 56)


def test_dice_bce_loss() -> None:
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    perfect = dice_bce_loss(torch.where(target > 0, 20.0, -20.0), target)
    wrong = dice_bce_loss(torch.where(target > 0, -20.0, 20.0), target)
    assert perfect.item() < 1e-3 < wrong.item()
    assert torch.isfinite(dice_bce_loss(torch.full((1, 1, 8, 8), -20.0), torch.zeros(1, 1, 8, 8)))


def test_segmentation_loss_of_k_classes() -> None:
    """K + 1 logits against class indices: near 0 when every pixel's class wins by far, large when another does;
    one logit: the binary Dice + BCE, unchanged."""
    labels = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    labels[:, :, 1:4, 1:4], labels[:, :, 5:8, 4:8] = 1, 2
    right = F.one_hot(labels[:, 0].long(), 3).permute(0, 3, 1, 2).float() * 40 - 20
    assert segmentation_loss(right, labels).item() < 1e-3 < segmentation_loss(right.roll(1, dims=1), labels).item()
    binary = (labels > 0).to(torch.uint8)
    logits = torch.randn(2, 1, 8, 8)
    assert torch.equal(segmentation_loss(logits, binary), dice_bce_loss(logits, binary.float()))
    assert UNet(build_backbone("resnet18", 1), classes=2).eval()(torch.randn(1, 1, 32, 32)).shape == (1, 3, 32, 32)


def test_joint_augment_moves_k_class_masks_with_the_image() -> None:
    """A 2-class mask whose image is its class index / 2: after augmentation each pixel's class is still the one the
    image shows (nearest class), and only the classes 0..2 occur."""
    labels = torch.zeros(8, 1, 32, 32, dtype=torch.uint8)
    labels[:, :, 4:14, 6:26], labels[:, :, 18:30, 4:16] = 1, 2
    images = labels.float() / 2
    out_images, out_labels = JointAugment(32, brightness=0.0, contrast=0.0)(
        images, labels, torch.Generator().manual_seed(3), classes=2
    )
    assert out_labels.dtype == torch.uint8 and set(out_labels.unique().tolist()) <= {0, 1, 2}
    assert not torch.equal(out_labels, labels)
    agree = (out_labels == (out_images * 2).round().to(torch.uint8)).float().mean()
    assert agree > 0.98  # edges, where bilinear weights tie differently, may differ


def test_joint_augment_moves_image_and_mask_together() -> None:
    """The mask is the thresholded image before augmentation; after it, it still is (geometry shared)."""
    torch.manual_seed(0)
    mask = torch.zeros(8, 1, 32, 32)
    mask[:, :, 8:20, 10:26] = 1
    images = mask.clone()
    augment = JointAugment(32, brightness=0.0, contrast=0.0)
    generator = torch.Generator().manual_seed(1)
    out_images, out_masks = augment(images, mask, generator)
    assert out_images.shape == images.shape and out_masks.shape == mask.shape
    assert set(out_masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out_masks, (out_images > 0.5).float())
    assert not torch.equal(out_masks, mask)  # something moved
    again, _ = JointAugment(32, brightness=0.0, contrast=0.0)(images, mask, torch.Generator().manual_seed(1))
    assert torch.equal(again, out_images)  # seeded


def test_threshold_calibration_finds_the_contour_of_an_outward_biased_prediction() -> None:
    """A prediction whose 0.5 contour lies 2 px outside the true disc: the training images' Dice is best at the
    threshold where the probability crosses the true boundary (sigmoid(2 / 1.5) ≈ 0.79), not at 0.5."""
    ys, xs = np.mgrid[:40, :40]
    radius = np.hypot(ys - 20.0, xs - 20.0)
    truth = radius <= 10
    probability = torch.sigmoid(torch.from_numpy((12.0 - radius) / 1.5).float())[None]
    data = SegmentData(
        pairs=[],
        task=MaskTask(("foreground",), indexed=False),
        groups=[],
        pixels=[],
        images=torch.empty(0),
        masks=torch.empty(0),
        shapes=[(40, 40)] * 3,
        truth_bits=[np.packbits(truth)] * 3,
        skipped=[],
        hd95_unit="px",
        hc_available=False,
    )
    threshold, dice = calibrate_threshold(torch.stack([probability] * 3), np.arange(3), data)
    assert threshold == 0.8 and dice[THRESHOLDS.index(0.8)] > 0.97 and dice[THRESHOLDS.index(0.5)] < 0.9
    assert np.array_equal(data.truth(1), truth[None])
    rng = np.random.default_rng(0)  # the one-pass Dice of every threshold is the Dice of each mask
    noisy = np.clip(probability[0].numpy() + rng.normal(0, 0.2, truth.shape), 0, 1)
    noisy[0, 0] = 0.5  # exactly on a threshold: not foreground there (p > t)
    assert np.allclose(dice_by_threshold(noisy, truth), [sm.dice(noisy > t, truth) for t in THRESHOLDS], rtol=1e-12)
    assert np.array_equal(dice_by_threshold(np.zeros((4, 4)), np.zeros((4, 4), dtype=bool)), np.ones(len(THRESHOLDS)))


def test_group_regex() -> None:
    assert image_groups(["010_HC", "010_2HC", "011_HC"], r"^(\d+)") == ["010", "010", "011"]
    assert image_groups(["a", "b"], None) == ["a", "b"]
    with pytest.raises(SegmentDataError, match="does not match 1 image"):
        image_groups(["010_HC", "x_HC"], r"^(\d+)")


def test_pixel_size_csv(tmp_path: Path) -> None:
    path = tmp_path / "px.csv"
    path.write_text("filename,pixel size(mm),head circumference (mm)\n000_HC.png,0.069,44.3\n")
    table = read_pixel_sizes(path)
    assert table["000_HC.png"] == {"pixel_size_mm": 0.069, "hc_mm": 44.3}
    assert table["000_HC"] is table["000_HC.png"]


def _synthetic_dataset(root: Path, count: int = 16, width: int = 56, height: int = 48) -> tuple[Path, Path, Path]:
    """``images/NN_k.png`` (bright filled ellipse with a brighter rim on speckle) and ``masks/NN_k_Mask.png``, HC18 style."""
    rng = np.random.default_rng(0)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    ys, xs = np.mgrid[:height, :width].astype(np.float64)
    rows = ["filename,pixel size(mm),head circumference (mm)"]
    for i in range(count):
        a, b = rng.uniform(10, 20), rng.uniform(8, 14)
        cx, cy = rng.uniform(a + 2, width - a - 2), rng.uniform(b + 2, height - b - 2)
        r = ((xs - cx) / a) ** 2 + ((ys - cy) / b) ** 2
        mask = r <= 1
        image = rng.normal(60, 20, (height, width)) + 80 * mask + 80 * (np.abs(r - 1) < 0.15)
        name = f"{i // 2:02d}_{i % 2}"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(images / f"{name}.png")
        Image.fromarray((np.repeat(mask[..., None], 3, axis=2) * 255).astype(np.uint8)).save(masks / f"{name}_Mask.png")
        hc = math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b))) * 0.1
        rows.append(f"{name}.png,0.1,{hc:.3f}")
    csv_path = root / "pixel_size_and_HC.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return images, masks, csv_path


def tiny_segment(images: Path, masks: Path, *extra: str, epochs: int = 1) -> list[str]:
    """``sonocl segment`` arguments of a run small enough for a test: 2 folds at 32 px, batch 4, on the CPU."""
    return ["segment", "--images", str(images), "--masks", str(masks), "--folds", "2", "--size", "32",
            "--epochs", str(epochs), "--batch-size", "4", "--device", "cpu", *extra]  # fmt: skip


def test_missing_mask_stops_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images, masks, _ = _synthetic_dataset(tmp_path, count=4)
    (masks / "01_1_Mask.png").unlink()
    code = main(
        [
            "segment",
            "--images",
            str(images),
            "--masks",
            str(masks),
            "--init",
            "random",
            "--folds",
            "2",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "01_1.png" in err and "01_1_Mask.png" in err and "--skip-bad-masks" in err
    assert not (tmp_path / "out" / "results.json").exists()


def test_end_to_end_on_synthetic_ellipses(tmp_path: Path) -> None:
    images, masks, pixel_csv = _synthetic_dataset(tmp_path / "data")
    Image.fromarray(np.zeros((48, 56), dtype=np.uint8)).save(images / "99_orphan.png")  # no mask: skipped, exit 3
    out = tmp_path / "out"
    code = main(
        tiny_segment(images, masks, "--init", "random", "--group-regex", r"^(\d+)", "--pixel-size", str(pixel_csv),
                     "--lr", "3e-3", "--overlays", "2", "--skip-bad-masks", "--out", str(out), epochs=4)
    )  # fmt: skip
    assert code == 3  # finished, one image skipped

    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == "sonocl.segment/1"
    data = results["data"]
    assert data["num_images"] == 16 and data["num_groups"] == 8 and data["hd95_unit"] == "mm"
    assert [s["image"].endswith("99_orphan.png") for s in data["skipped"]] == [True]
    tests = [set(fold["test_images"]) for fold in data["folds"]]
    assert tests[0].isdisjoint(tests[1]) and len(tests[0] | tests[1]) == 16
    for name in tests[0]:  # grouped: an examination never on both sides
        assert not any(other.split("_")[0] == name.split("_")[0] for other in tests[1])
    assert data["hc_fit_on_truth_abs_error_mm"]["mean"] < 0.3  # the fit itself is accurate (HC ~ 9 mm here)

    [init] = results["inits"]
    assert init["init_report"]["kind"] == "random" and (init["mean"], init["std"]) == (0.5, 0.25)
    assert [fold["fold"] for fold in init["folds"]] == [0, 1]
    for fold in init["folds"]:  # calibrated on the training images by default
        assert fold["threshold"] in THRESHOLDS and len(fold["train_dice_by_threshold"]) == len(THRESHOLDS)
        assert fold["threshold"] == THRESHOLDS[int(np.argmax(fold["train_dice_by_threshold"]))]
    for metric in ("dice", "iou", "hd95_px", "hd95_mm", "hc_abs_error_mm"):
        assert init["summary"][metric]["n"] == 2 and init["pooled"][metric]["n"] == 16
    # learned something: well above an empty prediction (Dice 0) and an all-foreground one
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert len(rows) == 16
    all_foreground = np.mean([2 * int(r["true_area_px"]) / (int(r["true_area_px"]) + 48 * 56) for r in rows])
    assert init["pooled"]["dice"]["mean"] > max(0.5, all_foreground + 0.1)

    assert results["config"]["postprocess"] is True  # on by default: the CSV gives head circumferences
    table = (out / "results.md").read_text()
    assert "| random |" in table and "HC abs. error (mm)" in table and "1 image(s) skipped" in table
    assert "Dice median | HD95 (mm) median | HC abs. error (mm) median |" in table
    assert "largest predicted component" in table
    timing = results["timing"]
    assert timing["jobs"] == 1 and timing["train_seconds"] > 0  # scoring 8 tiny images may round to 0.0 s
    assert all(timing[f"{part}_seconds"] >= 0 for part in ("load", "calibrate", "predict", "score"))
    overlays = sorted(p.relative_to(out).as_posix() for p in (out / "overlays").rglob("*.png"))
    assert overlays == ["overlays/random/00_0.png", "overlays/random/00_1.png"]
    overlay = np.asarray(Image.open(out / "overlays" / "random" / "00_0.png"))
    assert overlay.shape == (48, 56, 3)
    assert ((overlay == [0, 255, 0]).all(axis=2)).any()  # ground-truth contour drawn


def test_init_from_a_saved_encoder_file(tmp_path: Path) -> None:
    """Any file of `sonocl.models.save_encoder` works as --init: its weights, and its mean/std by default."""
    images, masks, _ = _synthetic_dataset(tmp_path / "data", count=8)
    run_dir = tmp_path / "run_simclr"
    run_dir.mkdir()
    torch.manual_seed(0)
    save_encoder(
        build_backbone("resnet18", 1),
        run_dir / "encoder.safetensors",
        {"arch": "resnet18", "channels": 1, "size": 32, "mean": 0.4, "std": 0.3, "method": "simclr"},
    )
    out = tmp_path / "out"
    code = main(
        tiny_segment(images, masks, "--init", str(run_dir / "encoder.safetensors"), str(run_dir), "--name", "file",
                     "run", "--overlays", "0", "--freeze-encoder", "--threshold", "0.5", "--out", str(out))
    )  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [init["name"] for init in results["inits"]] == ["file", "run"]
    assert results["config"]["postprocess"] is False  # no head circumferences: every predicted pixel is scored
    assert {
        (fold["threshold"], fold["train_dice_by_threshold"]) for init in results["inits"] for fold in init["folds"]
    } == {(0.5, None)}  # a fixed threshold is not calibrated
    for init in results["inits"]:
        assert init["init_report"]["kind"] == "sonocl" and init["init_report"]["loaded"] > 0
        assert (init["mean"], init["std"]) == (pytest.approx(0.4), pytest.approx(0.3))
    assert not (out / "overlays").exists()


def test_config_is_checked_when_built_and_names_the_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"--size 16: must be ≥ 32.*--lr -1.0: must be > 0"):
        SegmentConfig(images=tmp_path, init=("random",), out=tmp_path / "out", size=16, lr=-1.0)
    with pytest.raises(ConfigError, match="--name .*2 names for 1 --init"):
        SegmentConfig(images=tmp_path, init=("random",), out=tmp_path / "out", name=("a", "b"))
    with pytest.raises(ConfigError, match="--group-regex .*not a regular expression"):
        SegmentConfig(images=tmp_path, init=("random",), out=tmp_path / "out", group_regex="(")
    with pytest.raises(ConfigError, match="--device 'tpu': use auto, cpu, cuda or cuda:N"):
        SegmentConfig(images=tmp_path, init=("random",), out=tmp_path / "out", device="tpu")
    with pytest.raises(ConfigError, match="--pixel-size .*no such file"):
        SegmentConfig(images=tmp_path, init=("random",), out=tmp_path / "out", pixel_size=tmp_path / "px.csv")
    code = main(
        [
            "segment",
            "--images",
            str(tmp_path),
            "--init",
            "random",
            "random",
            "--jobs",
            "0",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    [line] = capsys.readouterr().err.strip().splitlines()  # one line, no traceback, before anything is read
    assert line.startswith("sonocl segment: ") and "--jobs 0: must be ≥ 1" in line and "labels" in line


def test_parallel_jobs_give_the_same_scores_as_one_process(tmp_path: Path) -> None:
    """--jobs 2 trains and scores the fold runs in 2 spawned single-thread workers: the same per-image scores, in
    the same order, as one single-thread process."""
    images, masks, pixel_csv = _synthetic_dataset(tmp_path / "data", count=8)
    common = tiny_segment(images, masks, "--init", "random", "--group-regex", r"^(\d+)", "--pixel-size", str(pixel_csv),
                          "--overlays", "1")  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*common, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert main([*common, "--jobs", "2", "--out", str(tmp_path / "two")]) == 0
    per_image = [(tmp_path / run / "per_image.csv").read_text() for run in ("one", "two")]
    assert per_image[0] == per_image[1] and len(per_image[0].splitlines()) == 1 + 8
    results = [json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "two")]
    assert [r["timing"]["jobs"] for r in results] == [1, 2]
    assert results[0]["inits"][0]["pooled"] == results[1]["inits"][0]["pooled"]
    assert (tmp_path / "two" / "overlays" / "random" / "00_0.png").exists()


def test_a_rerun_resumes_at_the_first_unfinished_fold(tmp_path: Path) -> None:
    """Each fold run is saved as it finishes (OUT/folds); a rerun reads the finished ones back and runs the rest,
    and ends with the tables of an uninterrupted run. Changed settings are not read back."""
    images, masks, pixel_csv = _synthetic_dataset(tmp_path / "data", count=8)
    common = tiny_segment(images, masks, "--init", "random", "--group-regex", r"^(\d+)", "--pixel-size", str(pixel_csv),
                          "--overlays", "0", "--out", str(tmp_path / "out"))  # fmt: skip
    assert main(common) == 0
    folds = tmp_path / "out" / "folds"
    first = (folds / "init0_fold0.json").stat().st_mtime_ns
    uninterrupted = (tmp_path / "out" / "per_image.csv").read_text()
    (folds / "init0_fold1.json").unlink()  # as if killed while the second fold was training
    assert main(common) == 0
    assert (folds / "init0_fold0.json").stat().st_mtime_ns == first and (folds / "init0_fold1.json").exists()
    assert (tmp_path / "out" / "per_image.csv").read_text() == uninterrupted
    assert main([*common, "--lr", "5e-3"]) == 0  # another learning rate: every fold runs again
    assert (folds / "init0_fold0.json").stat().st_mtime_ns != first


def test_an_encoder_pretrained_on_the_segmented_images_is_stamped(tmp_path: Path) -> None:
    """Images a run pretrained on (matched by the file's sha256) are counted and the table says so."""
    import hashlib
    import json

    from sonocl.evaluate.masks import MaskPair
    from sonocl.evaluate.segment import pretraining_overlap

    images = []
    for k in range(3):
        path = tmp_path / f"img{k}.png"
        path.write_bytes(bytes([k]) * 64)
        images.append(MaskPair(path, (), f"img{k}"))
    run = tmp_path / "run"
    run.mkdir()
    seen = [hashlib.sha256(images[0].image.read_bytes()).hexdigest()]
    (run / "provenance.json").write_text(json.dumps({"trained_on": seen, "labels_used": [], "held_out": []}))
    stamp = pretraining_overlap(str(run), images)
    assert stamp["seen"] == 1 and stamp["note"] == "transductive: 1 of 3 images seen in pretraining"
    assert pretraining_overlap("random", images)["note"] == ""


def _two_class_dataset(root: Path, count: int = 12, size: int = 48) -> tuple[Path, Path]:
    """``images/NN.png`` with a bright disc (class 1) and a dark-rimmed square (class 2) on speckle, and palette PNG
    masks ``masks/NN.png`` holding 0, 1 and 2."""
    rng = np.random.default_rng(1)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    ys, xs = np.mgrid[:size, :size]
    for i in range(count):
        labels = np.zeros((size, size), dtype=np.uint8)
        cx, cy = rng.integers(10, 20), rng.integers(10, 38)
        labels[(xs - cx) ** 2 + (ys - cy) ** 2 <= 64] = 1
        top, left = rng.integers(8, 30), rng.integers(28, 36)
        labels[top : top + 10, left : left + 10] = 2
        image = rng.normal(90, 15, (size, size)) + 90 * (labels == 1) - 60 * (labels == 2)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(images / f"{i:02d}.png")
        mask = Image.fromarray(labels, mode="P")
        mask.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
        mask.save(masks / f"{i:02d}.png")
    return images, masks


def test_masks_with_two_classes_are_segmented_as_two_classes(tmp_path: Path) -> None:
    """Palette masks with values {0, 1, 2}: two classes, each with its own Dice and HD95, the image's metrics their
    means; the trained U-Net finds both well above chance."""
    images, masks = _two_class_dataset(tmp_path / "data")
    out = tmp_path / "out"
    code = main(
        tiny_segment(images, masks, "--init", "random", "--class-names", "disc", "square", "--lr", "3e-3",
                     "--overlays", "1", "--out", str(out), epochs=6)
    )  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["classes"] == ["disc", "square"] and results["data"]["mask_values"] == "class indices"
    [init] = results["inits"]
    assert all(fold["threshold"] is None for fold in init["folds"])
    for name in ("disc", "square"):
        assert init["pooled"][f"dice_{name}"]["n"] == 12 and init["pooled"][f"dice_{name}"]["mean"] > 0.5
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    for row in rows:
        means = [float(row["dice_disc"]), float(row["dice_square"])]
        assert float(row["dice"]) == pytest.approx(sum(means) / 2)
        assert int(row["true_area_px_disc"]) > 0 and int(row["true_area_px_square"]) == 100
    table = (out / "results.md").read_text()
    assert "Dice (mean of classes)" in table and "| Dice disc |" in table and "HD95 (px) square" in table
    assert "each pixel the class of the highest probability" in table


@pytest.mark.parametrize(
    ("values", "extra", "message"),
    [
        ([0, 128, 255], [], "neither binary (0 and one other value) nor class indices 0..K"),
        ([0, 1, 2], ["--class-names", "nerve"], "the value 2, but the masks are class indices 0..1"),
        ([0, 1, 2], ["--threshold", "0.5"], "a threshold applies to binary masks only"),
        ([0, 1, 2], ["--mask-classes", "binary", "--class-names", "a", "b"], "binary has one foreground class"),
    ],
)
def test_masks_that_do_not_fit_the_task_get_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], values: list[int], extra: list[str], message: str
) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16), 100, dtype=np.uint8)).save(images / f"{i}.png")
        mask = np.zeros((16, 16), dtype=np.uint8)
        for k, value in enumerate(values):
            mask[k * 4 : k * 4 + 4] = value
        Image.fromarray(mask).save(masks / f"{i}.png")
    assert main(tiny_segment(images, masks, "--init", "random", *extra, "--out", str(tmp_path / "out"))) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "results.json").exists()


def test_one_mask_folder_per_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same two classes as binary masks in one folder each (0/255): the same task as the palette masks, named by
    the folders' names; an image without a mask in one class's folder is named with that class."""
    images, masks = _two_class_dataset(tmp_path / "data")
    for name, value in (("disc", 1), ("square", 2)):
        (tmp_path / name).mkdir()
        for path in sorted(masks.glob("*.png")):
            labels = np.asarray(Image.open(path))
            Image.fromarray(((labels == value) * 255).astype(np.uint8)).save(tmp_path / name / path.name)
    out = tmp_path / "out"
    folders = ["--class-masks", f"disc={tmp_path / 'disc'}", f"square={tmp_path / 'square'}"]
    args = tiny_segment(images, masks, "--init", "random", *folders, "--out", str(out), epochs=1)
    args.remove("--masks"), args.remove(str(masks))
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["classes"] == ["disc", "square"]
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert all(int(row["true_area_px_square"]) == 100 and int(row["true_area_px_disc"]) > 0 for row in rows)
    (tmp_path / "square" / "03.png").unlink()
    assert main([*args[:-1], str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "03.png: class square: no mask found" in err and "--skip-bad-masks" in err
