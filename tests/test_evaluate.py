"""`sonocl evaluate`: frame sampling, leak-free grouped folds, protocols, model selection, end-to-end outputs.

Everything runs on the phantom store at 32 px with 1–3 epochs (seconds on a CPU).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json

import numpy as np
import pytest
import torch
import torchvision

from sonocl.cli import main
from sonocl.data.store_writer import FrameStoreWriter
from sonocl.evaluate.classify import evaluate_init
from sonocl.evaluate.config import OPTIMISTIC, EvalConfig
from sonocl.evaluate.cpu_kernels import GemmConv2d
from sonocl.evaluate.data import check_disjoint, fold_splits, load_eval_data, sample_frames
from sonocl.evaluate.finetune import FineTuneModel, select_epoch
from sonocl.evaluate.inits import load_init

TINY = dict(size=32, epochs=2, batch_size=16, folds=3, fps=0, frames_per_video=6, device="cpu")


def _config(**overrides) -> EvalConfig:
    return EvalConfig.from_recipe("meta-uscl", **{**TINY, **overrides})


@pytest.fixture(scope="module")
def data(phantom_store):
    return load_eval_data(phantom_store, _config())


def test_sample_frames_at_fps_from_timestamps():
    timestamps = np.arange(24) / 20.0  # 20 fps
    # targets 0, 1/3, 2/3, 1 s → nearest frames 0 (0.0), 7 (0.35), 13 (0.65), 20 (1.0)
    assert sample_frames(timestamps, 3.0, 30).tolist() == [0, 7, 13, 20]
    assert sample_frames(timestamps, 3.0, 2).tolist() == [0, 7]
    assert sample_frames(timestamps, 0.0, 0).tolist() == list(range(24))
    assert sample_frames(np.array([0.0]), 3.0, 30).tolist() == [0]  # a still image
    assert sample_frames(np.arange(5) / 2.0, 3.0, 30).tolist() == [0, 1, 2, 3, 4]  # slower than 3 fps: all


def test_load_eval_data_and_class_filter(phantom_store, data):
    assert data.class_names == ["covid", "pneumonia", "regular"]
    assert data.images.shape == (12 * 6, 1, 32, 32) and data.images.dtype == torch.uint8
    assert data.frame_index.max() == 5
    filtered = load_eval_data(phantom_store, _config(classes=("regular", "covid")))
    assert filtered.class_names == ["regular", "covid"] and len(filtered.video_ids) == 8
    assert all(v.startswith(("reg", "cov")) for v in filtered.video_ids)
    with pytest.raises(ValueError, match="viral"):
        load_eval_data(phantom_store, _config(classes=("covid", "viral")))


@pytest.mark.parametrize("group_by", ["video", "group"])
def test_no_video_or_group_in_train_and_test(data, group_by):
    config = _config(group_by=group_by)
    for seed in (0, 1):
        folds = fold_splits(data, config, seed)
        assert len(folds) == 3
        tested = np.concatenate([test for _, test in folds])
        assert sorted(tested.tolist()) == list(range(len(data.video_ids)))  # each video tested exactly once
        for train, test in folds:
            assert not set(train) & set(test)
            assert not set(data.frames_of(train)) & set(data.frames_of(test))
            if group_by == "group":
                assert not set(data.video_groups[train]) & set(data.video_groups[test])
    with pytest.raises(AssertionError, match="both train and test"):
        check_disjoint(np.array([0, 1]), np.array([1, 2]), data, by_group=False)
    patient = data.video_groups
    same_patient = [v for v in range(len(patient)) if patient[v] == patient[0] and v != 0]
    with pytest.raises(AssertionError, match="groups in both"):
        check_disjoint(np.array([0]), np.array(same_patient), data, by_group=True)


def test_select_epoch():
    test = [0.5, 0.8, 0.6, 0.7]
    val = [0.4, 0.9, 0.9, 0.3]
    assert select_epoch("last", test, None) == 3
    assert select_epoch("max-test", test, val) == 1
    assert select_epoch("inner-val", test, val) == 2  # latest of the tied best validation epochs
    assert test[select_epoch("max-test", test, val)] >= test[select_epoch("last", test, None)]


def test_last_block_trains_only_the_last_block_and_updates_frozen_bn():
    backbone = torchvision.models.resnet18(weights=None)
    backbone.fc = torch.nn.Identity()
    model = FineTuneModel(backbone, 3, "last-block", freeze_bn=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("trainable.0.", "head.")) for n in trainable)
    assert model.trainable[0] is backbone.layer4[1]
    before = backbone.bn1.running_mean.clone()
    model.train()(torch.rand(4, 3, 32, 32)).sum().backward()
    assert not torch.equal(before, backbone.bn1.running_mean)  # papers: frozen layers' BN statistics still move
    assert backbone.layer4[1].conv1.weight.grad is not None and backbone.layer3[0].conv1.weight.grad is None
    frozen_bn = FineTuneModel(backbone, 3, "last-block", freeze_bn=True).train()
    before = backbone.bn1.running_mean.clone()
    frozen_bn(torch.rand(4, 3, 32, 32))
    assert torch.equal(before, backbone.bn1.running_mean)


@pytest.mark.parametrize(
    "stride, padding, dilation, bias", [(1, 1, 1, False), (2, 1, 1, True), (1, 2, 2, False), (2, 0, 1, False)]
)
def test_gemm_conv_equals_conv2d(stride, padding, dilation, bias):
    conv = torch.nn.Conv2d(6, 5, 3, stride=stride, padding=padding, dilation=dilation, bias=bias)
    gemm = GemmConv2d.sharing(conv)
    assert gemm.weight is conv.weight
    x = torch.randn(4, 6, 5, 7, requires_grad=True)
    expected, got = conv(x), gemm(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), x)
    (grad_got,) = torch.autograd.grad(got.square().sum(), x)
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("protocol, size", [("last-block", 64), ("last-block", 160), ("full", 64), ("linear", 32)])
def test_cpu_optimised_model_matches_the_plain_one(protocol, size):
    """Layout switches and GEMM convs change kernels only: same trainable set, outputs, gradients, BN statistics.

    Compared in float64, where rounding cannot hide a difference (train-mode BatchNorm on a batch of 6 amplifies
    float32 rounding of any kernel change far beyond a useful tolerance)."""
    backbone = torchvision.models.resnet18(weights=None)
    backbone.fc = torch.nn.Identity()
    plain = FineTuneModel(copy.deepcopy(backbone), 3, protocol, freeze_bn=False).double()
    tuned = FineTuneModel(copy.deepcopy(backbone), 3, protocol, freeze_bn=False).double()
    tuned.head.load_state_dict(plain.head.state_dict())
    tuned.optimise_for_cpu(size)
    gemm_convs = sum(isinstance(m, GemmConv2d) for m in tuned.modules())
    assert (
        gemm_convs
        == {("last-block", 64): 2, ("last-block", 160): 0, ("full", 64): 10, ("linear", 32): 0}[(protocol, size)]
    )
    x = torch.rand(6, 3, size, size, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    outputs = []
    for model in (plain, tuned):
        logits = model.train()(x)
        torch.nn.functional.cross_entropy(logits, y).backward()
        outputs.append(logits)
    torch.testing.assert_close(outputs[1], outputs[0])
    for p, q in zip(plain.parameters(), tuned.parameters(), strict=True):
        assert p.requires_grad == q.requires_grad and (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad)
    for a, b in zip(plain.buffers(), tuned.buffers(), strict=True):
        torch.testing.assert_close(b, a)


def test_selection_modes_on_one_run(data):
    backbone, report = load_init("random", "resnet18", 1)
    max_test = evaluate_init(
        data, backbone, report, "random", _config(protocol="linear", epochs=3, selection="max-test")
    )
    assert max_test["optimistic"] and max_test["selection_note"] == OPTIMISTIC
    for run in max_test["runs"]:
        by_epoch = run["test_accuracy_by_epoch"]
        assert len(by_epoch) == 3
        assert run["frame"]["accuracy"] == pytest.approx(max(by_epoch))
        assert run["frame"]["accuracy"] >= by_epoch[-1]  # max-test ≥ last on the same predictions
    last = evaluate_init(data, backbone, report, "random", _config(protocol="linear", epochs=3, selection="last"))
    assert not last["optimistic"] and all(run["selected_epoch"] == 3 for run in last["runs"])
    for run_last, run_max in zip(last["runs"], max_test["runs"]):  # same seeds: the same training run
        assert run_last["frame"]["accuracy"] == pytest.approx(run_max["test_accuracy_by_epoch"][-1])
    assert all(run["test_accuracy_by_epoch"] is None for run in last["runs"])  # tested once, after the last epoch
    curve = evaluate_init(data, backbone, report, "random", _config(protocol="linear", epochs=3, test_every_epoch=True))
    for run_curve, run_max in zip(curve["runs"], max_test["runs"]):
        assert run_curve["test_accuracy_by_epoch"] == pytest.approx(run_max["test_accuracy_by_epoch"])
        assert run_curve["selected_epoch"] == 3


def test_inner_val_tests_the_snapshot_of_its_selected_epoch(data):
    """inner-val predicts the test fold once, from the model saved at the selected epoch: the same predictions as
    testing after every epoch and picking that epoch (last-block, so BatchNorm buffers are part of the snapshot)."""
    torch.manual_seed(0)  # the random init's weights: not those of whatever ran before
    backbone, report = load_init("random", "resnet18", 1)
    settings = dict(protocol="last-block", epochs=3, selection="inner-val", lr=0.001)
    once = evaluate_init(data, backbone, report, "random", _config(**settings))
    every = evaluate_init(data, backbone, report, "random", _config(**settings, test_every_epoch=True))
    for run_once, run_every in zip(once["runs"], every["runs"], strict=True):
        assert (
            run_once["val_videos"] > 0
            and run_once["train_videos"] + run_once["val_videos"] + run_once["test_videos"] == 12
        )
        val = run_once["val_balanced_accuracy_by_epoch"]
        assert run_once["selected_epoch"] == select_epoch("inner-val", None, val) + 1 == run_every["selected_epoch"]
        assert run_once["test_accuracy_by_epoch"] is None and len(run_every["test_accuracy_by_epoch"]) == 3
        assert run_once["frame"]["accuracy"] == pytest.approx(
            run_every["test_accuracy_by_epoch"][run_every["selected_epoch"] - 1]
        )
        assert run_once["frame"]["confusion"] == run_every["frame"]["confusion"]
    assert any(run["selected_epoch"] < 3 for run in once["runs"])  # a snapshot before the last epoch was restored


def test_knn_and_full_protocols(data):
    backbone, report = load_init("random", "resnet18", 1)
    rows = []
    knn = evaluate_init(data, backbone, report, "random", _config(protocol="knn", group_by="group"), rows.append)
    assert all(run["selected_epoch"] == 0 for run in knn["runs"])
    probabilities = np.concatenate([row["probabilities"] for row in rows])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    full = evaluate_init(data, backbone, report, "random", _config(protocol="full", epochs=1, folds=2))
    assert len(full["runs"]) == 2 and full["pooled"]["video"]["n"] == 12


def _uscl_checkpoint(path) -> None:
    source = torchvision.models.resnet18(weights=None)
    features = torch.nn.Sequential(*list(source.children())[:-1])
    state = {f"module.features.{k}": v for k, v in features.state_dict().items()}
    state.update({"module.l1.weight": torch.zeros(512, 512), "module.fc.weight": torch.zeros(12, 512)})
    torch.save({"state_dict": state}, path)


def test_end_to_end_cli_writes_all_outputs(phantom_store, tmp_path, capsys):
    checkpoint = tmp_path / "uscl_best_model.pth"
    _uscl_checkpoint(checkpoint)
    out = tmp_path / "eval"
    code = main(
        [
            "evaluate",
            "--store",
            str(phantom_store.root),
            "--init",
            "random",
            str(checkpoint),
            "--name",
            "scratch",
            "uscl",
            "--protocol",
            "last-block",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--size",
            "32",
            "--folds",
            "3",
            "--fps",
            "3",
            "--selection",
            "max-test",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [entry["label"] for entry in results["inits"]] == ["scratch", "uscl"]
    assert results["optimistic"] and results["config"]["recipe"] == "meta-uscl" and results["config"]["lr"] == 0.01
    uscl = results["inits"][1]
    assert uscl["init_report"]["kind"] == "foreign" and sorted(uscl["init_report"]["ignored"]) == [
        "fc.weight",
        "l1.weight",
    ]
    for entry in results["inits"]:
        assert len(entry["runs"]) == 3 and entry["selection_note"] == OPTIMISTIC
        assert set(entry["summary"]["video"]) == {"accuracy", "balanced_accuracy", "macro_f1", "macro_auc"}
        assert np.sum(entry["pooled"]["video"]["confusion"]) == 12
        tested = [v for run in entry["runs"] for v in run["test_video_ids"]]
        assert sorted(tested) == sorted(v.id for v in phantom_store.videos)
    markdown = (out / "results.md").read_text()
    assert "optimistic (selected on the test fold)" in markdown and "| scratch (optimistic) |" in markdown
    with open(out / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    frames_per_video = 4  # 24 frames at 20 fps, sampled at 3 fps: 0, 0.35, 0.65, 1.0 s
    assert len(rows) == 2 * 12 * frames_per_video
    assert set(rows[0]) == {
        "init",
        "video_id",
        "frame_index",
        "fold",
        "seed",
        "label",
        "p_covid",
        "p_pneumonia",
        "p_regular",
        "predicted",
        "selection",
    }
    assert all(OPTIMISTIC in row["selection"] for row in rows)
    folds_of_video = {(row["init"], row["video_id"]): set() for row in rows}
    for row in rows:
        folds_of_video[(row["init"], row["video_id"])].add(row["fold"])
    assert all(len(folds) == 1 for folds in folds_of_video.values())
    assert "loaded 120 backbone tensors" in capsys.readouterr().err


def test_parallel_jobs_give_the_same_results_as_one_process(phantom_store, tmp_path):
    """--jobs 2 runs the fold runs in 2 spawned single-thread workers: same predictions, same order, as the
    in-process run with one thread; results.json records the jobs."""
    common = [
        "evaluate",
        "--store",
        str(phantom_store.root),
        "--init",
        "random",
        "random",
        "--name",
        "a",
        "b",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--size",
        "32",
        "--folds",
        "2",
        "--device",
        "cpu",
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*common, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert main([*common, "--jobs", "2", "--out", str(tmp_path / "two")]) == 0
    predictions = [(tmp_path / run / "predictions.csv").read_text() for run in ("one", "two")]
    assert predictions[0] == predictions[1] and len(predictions[0].splitlines()) == 1 + 2 * 12 * 4
    results = [json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "two")]
    assert [r["timing"]["jobs"] for r in results] == [1, 2]
    for one, two in zip(results[0]["inits"], results[1]["inits"]):
        assert one["label"] == two["label"] and one["summary"] == two["summary"] and one["pooled"] == two["pooled"]


def test_still_images_and_bad_init(tmp_path, capsys):
    """A store of still images (one frame per "video") evaluates the same way; a bad --init fails fast."""
    rng = np.random.default_rng(0)
    with FrameStoreWriter(tmp_path / "images", 32) as writer:
        for index in range(9):
            label = ("benign", "malignant", "normal")[index % 3]
            image = (rng.random((32, 32)) * 80 + 60 * (index % 3)).astype(np.uint8)
            writer.add_video(
                [image],
                id=f"img{index}",
                source=f"{label}/img{index}.png",
                label=label,
                group=f"img{index}",
                fps=None,
                timestamps=[0.0],
                original_size=(32, 32),
                crop_box=(0, 0, 32, 32),
                content_hash=hashlib.sha256(image.tobytes()).hexdigest(),
            )
    out = tmp_path / "eval"
    args = [
        "evaluate",
        "--store",
        str(tmp_path / "images"),
        "--protocol",
        "knn",
        "--size",
        "32",
        "--folds",
        "3",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert main([*args, "--init", "random"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["num_frames"] == 9 and results["inits"][0]["pooled"]["frame"]["n"] == 9
    assert main([*args, "--init", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth" in capsys.readouterr().err


def test_a_rerun_with_more_seeds_reads_back_the_finished_ones(phantom_store, tmp_path):
    """The fold cache does not depend on --seeds: going from 1 seed to 2 computes only seed 1's folds."""
    common = ["evaluate", "--store", str(phantom_store.root), "--init", "random", "--protocol", "knn", "--size", "32"]
    common += ["--folds", "2", "--fps", "0", "--frames-per-video", "4", "--device", "cpu", "--out", str(tmp_path)]
    assert main([*common, "--seeds", "1"]) == 0
    cached = tmp_path / "folds" / "random" / "seed0_fold0.npz"
    first, before = cached.stat().st_mtime_ns, json.loads((tmp_path / "results.json").read_text())["inits"][0]
    assert main([*common, "--seeds", "2"]) == 0
    after = json.loads((tmp_path / "results.json").read_text())["inits"][0]
    assert cached.stat().st_mtime_ns == first
    assert sorted(path.name for path in cached.parent.iterdir()) == [
        f"seed{seed}_fold{fold}.npz" for seed in (0, 1) for fold in (0, 1)
    ]
    assert len(after["runs"]) == 2 * len(before["runs"]) and after["runs"][: len(before["runs"])] == before["runs"]
    assert after["pretraining_overlap"]["test_videos"] == 12  # each video once, not once per seed
