"""`sonocl export`: the bundle round-trips (plain torchvision, plain timm, onnxruntime and sonocl give the run's
features), its metadata and model card say what the run did, its provenance and evaluation are carried,
`evaluate`/`segment --init DIR` load it."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file

import sonocl
from conftest import tiny_pretrain
from sonocl.cli import main
from sonocl.evaluate.inits import load_init
from sonocl.models import encoder_metadata, read_state_dict
from test_segment import _synthetic_dataset, tiny_segment

TINY_RUN = tiny_pretrain("--threads", "1", batch_size=8)


@pytest.fixture(scope="module")
def run_and_eval(phantom_store, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A one-epoch SimCLR run on the phantom at 32 px and its kNN evaluation against random init (2 folds)."""
    root = tmp_path_factory.mktemp("export")
    run, evaluation = root / "run", root / "eval"
    store = str(phantom_store.root)
    assert main(["pretrain", "--store", store, "--method", "simclr", "--out", str(run), *TINY_RUN]) == 0
    assert (
        main(
            [
                "evaluate",
                "--store",
                store,
                "--init",
                "random",
                str(run),
                "--protocol",
                "knn",
                "--folds",
                "2",
                "--size",
                "32",
                "--fps",
                "0",
                "--frames-per-video",
                "4",
                "--out",
                str(evaluation),
            ]
        )
        == 0
    )
    return run, evaluation


@pytest.fixture(scope="module")
def bundle(run_and_eval: tuple[Path, Path]) -> Path:
    run, evaluation = run_and_eval
    out = run.parent / "bundle"
    assert main(["export", str(run), "--out", str(out), "--eval", str(evaluation)]) == 0
    return out


def test_bundle_gives_the_runs_features_in_plain_torchvision_and_in_sonocl(run_and_eval, bundle: Path) -> None:
    run, _ = run_and_eval
    assert sorted(p.name for p in bundle.iterdir()) == [
        "README.md",
        "config.json",
        "encoder.safetensors",
        "sonocl_encoder.json",
    ]
    plain = torchvision.models.resnet18()
    plain.fc = torch.nn.Identity()
    plain.load_state_dict(load_file(str(bundle / "encoder.safetensors")))  # strict: every key, torchvision names
    ours, reloaded = sonocl.load_encoder(str(run)).eval(), sonocl.load_encoder(str(bundle)).eval()
    grey = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = ours(grey)
        assert torch.equal(reloaded(grey), reference)
        assert torch.allclose(plain.eval()(grey.expand(-1, 3, -1, -1)), reference, atol=1e-4)  # the stem split in 3


def test_metadata_says_what_the_run_did(run_and_eval, bundle: Path) -> None:
    run, evaluation = run_and_eval
    meta = json.loads((bundle / "sonocl_encoder.json").read_text())
    header = encoder_metadata(run / "encoder.safetensors")
    assert meta["schema"] == "sonocl.encoder/1" and meta["sonocl_version"] == sonocl.__version__
    assert (meta["arch"], meta["channels"], meta["method"], meta["feature_dim"]) == ("resnet18", 1, "simclr", 512)
    assert (meta["input"]["size"], meta["input"]["mean"], meta["input"]["std"]) == (32, header["mean"], header["std"])
    assert meta["weights"]["sha256"] == hashlib.sha256((bundle / "encoder.safetensors").read_bytes()).hexdigest()
    budget = meta["budget"]
    exported_from = "checkpoints/last.pt" if meta["pretrain_config"]["export"] == "last" else "checkpoints/best.pt"
    assert budget["checkpoint"] == exported_from
    checkpoint = read_state_dict(run / exported_from)
    assert budget["steps"] == checkpoint["global_step"] == budget["steps_per_epoch"] > 0
    assert (budget["batch_size"], budget["pairs_seen"], budget["epochs"]) == (8, 8 * budget["steps"], 1)
    assert budget["wall_seconds"] > 0 and set(budget["monitors"]) >= {"val_loss", "embedding_std"}
    assert meta["pretrain_config"]["method"] == "simclr"
    labels = {entry["label"]: entry["this_encoder"] for entry in meta["evaluation"]["inits"]}
    assert labels == {"random": False, "run": True}
    assert (meta["evaluation"]["protocol"], meta["evaluation"]["folds"]) == ("knn", 2)
    assert meta["evaluation"]["results"] == str((evaluation / "results.json").resolve())


def test_model_card_code_runs_and_its_table_is_the_evaluation(run_and_eval, bundle: Path) -> None:
    card = (bundle / "README.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert card.startswith("---\nlibrary_name: timm\npipeline_tag: image-feature-extraction\ntags:\n- sonocl\n")
    assert len(snippets) == 3 and len(snippets[1].strip().splitlines()) == 3  # timm, torchvision, sonocl
    features = []
    for code in snippets:
        scope: dict = {}
        exec(code.replace("DIR", str(bundle)), scope)
        encoder = scope["encoder"].eval()
        channels = encoder.conv1.in_channels
        with torch.no_grad():
            features.append(encoder(torch.full((1, channels, 32, 32), 0.3)))
    assert all(torch.allclose(other, features[-1], atol=1e-4) for other in features[:-1])
    results = json.loads((run_and_eval[1] / "results.json").read_text())
    run_accuracy = next(e for e in results["inits"] if e["label"] == "run")["summary"]["video"]["accuracy"]
    assert f"| **run (this encoder)** | {100 * run_accuracy['mean']:.1f} ± {100 * run_accuracy['std']:.1f} |" in card
    assert "protocol **knn**, 2 folds grouped by " in card and "## Intended use" in card
    assert "- run: transductive: 12 of 12 test videos seen in pretraining" in card


def test_provenance_is_carried_whole_and_counted(run_and_eval, bundle: Path, tmp_path: Path) -> None:
    run, _ = run_and_eval
    provenance = json.loads((run / "provenance.json").read_text())
    meta = json.loads((bundle / "sonocl_encoder.json").read_text())
    assert meta["provenance"] == provenance
    summary = meta["provenance_summary"]
    assert summary["trained_on"] == len(provenance["trained_on"]) > 0
    assert summary["held_out"] == len(provenance["held_out"])
    assert summary["labels_used"] == provenance["labels_used"] == [] and "schema" not in summary
    card = (bundle / "README.md").read_text()
    assert f"- trained on: {summary['trained_on']}" in card and "- labels used: none" in card

    without = tmp_path / "old-run"  # a run of a sonocl that recorded no provenance
    without.mkdir()
    for entry in run.iterdir():
        if entry.name != "provenance.json":
            os.symlink(entry, without / entry.name)
    assert main(["export", str(without), "--out", str(tmp_path / "bundle")]) == 0
    meta = json.loads((tmp_path / "bundle" / "sonocl_encoder.json").read_text())
    assert meta["provenance"] is None and meta["provenance_summary"] == {} and meta["evaluation"] is None
    card = (tmp_path / "bundle" / "README.md").read_text()
    assert "recorded no `provenance.json`" in card and "Not evaluated in this bundle" in card


def test_evaluate_and_segment_take_the_bundle_as_init(phantom_store, bundle: Path, tmp_path: Path) -> None:
    model, report = load_init(str(bundle), "resnet18", 1)
    assert report.kind == "sonocl" and report.source == str(bundle / "encoder.safetensors")
    assert report.metadata["size"] == 32
    assert (
        main(
            [
                "evaluate",
                "--store",
                str(phantom_store.root),
                "--init",
                str(bundle),
                "--protocol",
                "knn",
                "--folds",
                "2",
                "--size",
                "32",
                "--fps",
                "0",
                "--frames-per-video",
                "2",
                "--out",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["inits"][0]["init_report"]["kind"] == "sonocl"
    images, masks, _ = _synthetic_dataset(tmp_path / "seg", count=8)
    assert (
        main(
            tiny_segment(
                images,
                masks,
                "--init",
                str(bundle),
                "--overlays",
                "0",
                "--freeze-encoder",
                "--out",
                str(tmp_path / "segment"),
            )
        )  # fmt: skip
        == 0
    )
    [init] = json.loads((tmp_path / "segment" / "results.json").read_text())["inits"]
    assert init["init_report"]["kind"] == "sonocl" and init["init_report"]["loaded"] > 0


def test_export_errors_name_the_file_and_exit_2(
    run_and_eval, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = run_and_eval
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert f"{tmp_path / 'encoder.safetensors'}: not found" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(tmp_path / "b"), "--eval", str(tmp_path)]) == 2
    assert f"{tmp_path / 'results.json'}: not found" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["resnet18", "timm:vit_tiny_patch16_224"])
def test_a_bundle_loads_in_plain_timm_and_its_onnx_graph_in_onnxruntime(
    arch: str, phantom_store, tmp_path: Path
) -> None:
    """Plain timm (its local-directory loader, `config.json`), onnxruntime (`--onnx`) and sonocl give one encoder's
    features, for a torchvision ResNet and a timm ViT."""
    import onnxruntime
    import timm

    run, out = tmp_path / "run", tmp_path / "bundle"
    argv = ["pretrain", "--store", str(phantom_store.root), "--method", "simclr", "--backbone", arch,
            "--out", str(run), *TINY_RUN, "--steps", "2"]  # fmt: skip
    assert main(argv) == 0
    assert main(["export", str(run), "--out", str(out), "--onnx"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 0 and config["pretrained_cfg"]["input_size"][1:] == [32, 32]
    ours = sonocl.load_encoder(str(out)).eval()
    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    stem = config["model_args"]["in_chans"]  # 3 for a ResNet (torchvision's stem), 1 for a timm model (as trained)
    assert stem == (3 if arch == "resnet18" else 1)
    grey = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = ours(grey)
        torch.testing.assert_close(plain(grey.expand(-1, stem, -1, -1)), reference, atol=1e-4, rtol=1e-4)
    session = onnxruntime.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    batch = grey[:2].expand(-1, stem, -1, -1).contiguous().numpy()  # another batch size than the export's
    torch.testing.assert_close(
        torch.from_numpy(session.run(None, {"images": batch})[0]), reference[:2], atol=1e-4, rtol=1e-4
    )
    card = (out / "README.md").read_text()
    assert 'timm.create_model("local-dir:DIR", pretrained=True)' in card
    assert ("torchvision.models.resnet18()" in card) == (arch == "resnet18")
