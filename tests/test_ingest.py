"""`sonocl ingest` and `sonocl info` end to end on small generated media.

Covers every source kind in one folder tree, label rules and CSV joins, idempotent and incremental
runs, the bad-input corpus, SIGKILL then resume, a concurrent ingest, and DICOM de-identification.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

from sonocl.cli import main
from sonocl.data.ingest import TEMP_DIR
from sonocl.data.ingest_workers import Decoded, DecodeTask, Failed, decode_to_file, run_tasks
from sonocl.data.labels import hashed_group
from sonocl.data.sources import Source
from sonocl.data.store import REPORT_FILE, FrameStore
from sonocl.data.store_writer import FrameStoreWriter
from test_decode import scan_frames, write_dicom, write_video

RULES = "cov=covid,pneu=pneumonia,reg=regular,vir=viral"
PLANTED_NAME = "Planted^Patientname"
PLANTED_ID = "PID-7731-SECRET"


def ingest(*args: str | Path, workers: int = 1) -> int:
    return main(["ingest", *map(str, args), "--workers", str(workers)])


def make_tree(root: Path) -> Path:
    """One of each source kind, nested, plus a file that is not media."""
    (root / "convex").mkdir(parents=True)
    write_video(root / "convex" / "Cov_a.mp4", scan_frames(10, 48, 64, seed=1), fps=10)
    write_video(root / "convex" / "Reg_b.AVI", scan_frames(8, 40, 40, seed=2), fps=8)
    write_video(root / "convex" / "Pneu_c.gif", scan_frames(6, 32, 32, seed=3), fps=5)
    Image.fromarray(scan_frames(1, 30, 40, seed=4)[0]).save(root / "Reg_still.png")
    (root / "dicom").mkdir()
    write_dicom(
        root / "dicom" / "Vir_cine.dcm",
        scan_frames(5, 24, 24, seed=5),
        fps=20,
        patient_name=PLANTED_NAME,
        patient_id=PLANTED_ID,
    )
    clip = root / "clips" / "Reg_clip"
    clip.mkdir(parents=True)
    for index, frame in enumerate(scan_frames(12, 20, 20, seed=6), start=1):
        Image.fromarray(frame).save(clip / f"frame{index}.png")
    (root / "notes.txt").write_text("not media\n")
    return root


EXPECTED = {
    "convex/Cov_a": ("convex/Cov_a.mp4", "covid", 10),
    "convex/Reg_b": ("convex/Reg_b.AVI", "regular", 8),
    "convex/Pneu_c": ("convex/Pneu_c.gif", "pneumonia", 6),
    "Reg_still": ("Reg_still.png", "regular", 1),
    "dicom/Vir_cine": ("dicom/Vir_cine.dcm", "viral", 5),
    "clips/Reg_clip": ("clips/Reg_clip", "regular", 12),
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tree(tmp_path_factory.mktemp("tree") / "data")


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_source_kind_goes_in_with_labels_ids_and_timing(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store_dir = tmp_path / "store"
    assert ingest(tree, "--out", store_dir, "--size", "32", "--label-from-name", RULES) == 0
    assert "6 added, 0 already in store, 0 skipped" in capsys.readouterr().out
    store = FrameStore.open(store_dir)
    assert store.size == 32 and store.frames.shape == (42, 32, 32)
    by_id = {video.id: video for video in store.videos}
    assert {key: (v.source, v.label, v.num_frames) for key, v in by_id.items()} == EXPECTED
    mp4 = by_id["convex/Cov_a"]
    assert mp4.fps == pytest.approx(10) and mp4.original_size == (48, 64)
    assert mp4.timestamps == pytest.approx([i / 10 for i in range(10)], abs=0.011)
    assert mp4.content_hash == file_digest(tree / "convex" / "Cov_a.mp4")
    assert by_id["dicom/Vir_cine"].group == hashed_group(store.salt, PLANTED_ID)
    assert by_id["convex/Reg_b"].group == "convex/Reg_b"
    clip = by_id["clips/Reg_clip"]
    assert clip.fps is None and clip.timestamps == tuple(float(i) for i in range(12))
    assert by_id["Reg_still"].fps is None and by_id["Reg_still"].num_frames == 1
    report = json.loads((store_dir / REPORT_FILE).read_text())
    assert report["counts"] == {"added": 6, "already_present": 0, "skipped": 0} and report["skipped"] == []
    assert not (store_dir / TEMP_DIR).exists()


def test_rerun_adds_nothing_and_new_files_are_appended(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store_dir = tmp_path / "store"
    assert ingest(tree, "--out", store_dir, "--size", "24") == 0
    frames_before = file_digest(store_dir / "frames.u8")
    videos_before = (store_dir / "videos.jsonl").read_text()
    capsys.readouterr()
    assert ingest(tree, "--out", store_dir) == 0
    assert "0 added, 6 already in store, 0 skipped" in capsys.readouterr().out
    assert file_digest(store_dir / "frames.u8") == frames_before
    assert (store_dir / "videos.jsonl").read_text() == videos_before

    extra = tmp_path / "more"
    extra.mkdir()
    write_video(extra / "Cov_new.mkv", scan_frames(4, 16, 16, seed=9))
    assert ingest(tree, extra, "--out", store_dir) == 0
    assert "1 added, 6 already in store" in capsys.readouterr().out
    store = FrameStore.open(store_dir)
    assert store.videos[-1].id == "Cov_new" and store.num_videos == 7
    assert (store_dir / "videos.jsonl").read_text().startswith(videos_before)


def test_changed_file_is_reported_and_the_stored_video_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "src"
    source.mkdir()
    write_video(source / "scan.mp4", scan_frames(4, 16, 16, seed=1))
    store_dir = tmp_path / "store"
    assert ingest(source, "--out", store_dir, "--size", "16") == 0
    write_video(source / "scan.mp4", scan_frames(5, 16, 16, seed=2))
    capsys.readouterr()
    assert ingest(source, "--out", store_dir) == 3
    assert "already in the store" in capsys.readouterr().err
    store = FrameStore.open(store_dir)
    assert store.num_videos == 1 and store.videos[0].num_frames == 4


def test_same_name_with_two_extensions_gets_two_ids(tmp_path: Path) -> None:
    write_video(tmp_path / "scan.mp4", scan_frames(3, 16, 16, seed=1))
    write_video(tmp_path / "scan.avi", scan_frames(4, 16, 16, seed=2))
    assert ingest(tmp_path, "--out", tmp_path / "store", "--size", "16") == 0
    ids = {video.source: video.id for video in FrameStore.open(tmp_path / "store").videos}
    assert ids == {"scan.avi": "scan", "scan.mp4": "scan.mp4"}


def test_worker_processes_store_the_same_frames_as_one_process(tree: Path, tmp_path: Path) -> None:
    assert ingest(tree, "--out", tmp_path / "one", "--size", "24") == 0
    assert ingest(tree, "--out", tmp_path / "two", "--size", "24", workers=2) == 0
    one, two = FrameStore.open(tmp_path / "one"), FrameStore.open(tmp_path / "two")
    frames_two = {video.id: two.video_frames(index) for index, video in enumerate(two.videos)}
    for index, video in enumerate(one.videos):
        assert np.array_equal(one.video_frames(index), frames_two[video.id])


def test_frame_selection_options(tmp_path: Path) -> None:
    write_video(tmp_path / "clip.mp4", scan_frames(30, 16, 16), fps=30)
    assert ingest(tmp_path / "clip.mp4", "--out", tmp_path / "stride", "--size", "16", "--stride", "4") == 0
    assert FrameStore.open(tmp_path / "stride").videos[0].num_frames == 8
    assert ingest(tmp_path / "clip.mp4", "--out", tmp_path / "fps", "--size", "16", "--fps", "10") == 0
    assert FrameStore.open(tmp_path / "fps").videos[0].timestamps == pytest.approx(
        [i / 10 for i in range(10)], abs=0.002
    )
    assert (
        ingest(tmp_path / "clip.mp4", "--out", tmp_path / "max", "--size", "16", "--max-frames", "5", "--crop", "none")
        == 0
    )
    video = FrameStore.open(tmp_path / "max").videos[0]
    assert video.num_frames == 5 and video.crop_box == (0, 0, 16, 16)


def make_bad_corpus(root: Path) -> dict[str, str]:
    """Broken files with a media extension, and the word their skip reason must contain."""
    root.mkdir()
    (root / "empty.mp4").write_bytes(b"")
    good = write_video(root / "whole.mp4", scan_frames(20, 32, 32)).read_bytes()
    (root / "whole.mp4").unlink()
    (root / "truncated.mp4").write_bytes(good[: len(good) // 2])
    (root / "text.avi").write_text("this is not a video\n")
    (root / "noise.mov").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    write_dicom(root / "no_pixels.dcm", scan_frames(1, 8, 8), with_pixels=False)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return {
        "empty.mp4": "empty",
        "truncated.mp4": "video",
        "text.avi": "video",
        "noise.mov": "video",
        "no_pixels.dcm": "pixel data",
        "broken.png": "image",
        "broken.jpg": "image",
    }


def test_bad_files_are_reported_and_the_rest_ingested(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = make_bad_corpus(tmp_path / "bad")
    write_video(tmp_path / "bad" / "good.mp4", scan_frames(6, 16, 16))
    store_dir = tmp_path / "store"
    assert ingest(tmp_path / "bad", "--out", store_dir, "--size", "16", workers=2) == 3
    err = capsys.readouterr().err
    report = json.loads((store_dir / REPORT_FILE).read_text())
    reasons = {Path(entry["file"]).name: entry["reason"] for entry in report["skipped"]}
    assert set(reasons) == set(bad)
    for name, word in bad.items():
        assert word in reasons[name], (name, reasons[name])
        assert f"{tmp_path / 'bad' / name}:" in err
    assert report["counts"] == {"added": 1, "already_present": 0, "skipped": len(bad)}
    assert [video.id for video in FrameStore.open(store_dir).videos] == ["good"]
    assert not (store_dir / TEMP_DIR).exists()

    other = tmp_path / "other"
    other.mkdir()
    write_video(other / "fine.mp4", scan_frames(3, 16, 16, seed=5))
    assert ingest(other, "--out", store_dir) == 0
    carried = json.loads((store_dir / REPORT_FILE).read_text())["skipped"]
    assert {Path(entry["file"]).name for entry in carried} == set(bad)
    (tmp_path / "bad" / "empty.mp4").unlink()
    assert ingest(tmp_path / "bad" / "text.avi", "--out", store_dir) == 3
    names = {Path(entry["file"]).name for entry in json.loads((store_dir / REPORT_FILE).read_text())["skipped"]}
    assert names == set(bad) - {"empty.mp4"}


def test_named_file_that_is_not_media_is_reported(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert ingest(tmp_path / "notes.txt", "--out", tmp_path / "store", "--size", "16") == 3
    skipped = json.loads((tmp_path / "store" / REPORT_FILE).read_text())["skipped"]
    assert skipped[0]["file"].endswith("notes.txt") and "not a video" in skipped[0]["reason"]


def _crash_on_second(task: DecodeTask) -> Decoded | Failed:
    if task.source.path.name == "crash.mp4":
        os._exit(1)
    return decode_to_file(task)


def test_a_crashing_decoder_is_isolated_and_reported(tmp_path: Path) -> None:
    paths = [
        write_video(tmp_path / f"{name}.mp4", scan_frames(3, 16, 16, seed=i))
        for i, name in enumerate(["a", "crash", "b", "c"])
    ]
    tasks = [
        DecodeTask(
            source=Source(path, PurePosixPath(path.name)),
            video_id=path.stem,
            content_hash=path.stem,
            temp_path=tmp_path / f"{path.stem}.u8",
            size=16,
            auto_crop=True,
            stride=1,
            max_fps=None,
            max_frames=None,
            salt="salt",
            decoder_threads=1,
        )
        for path in paths
    ]
    outcomes: dict[str, Decoded | Failed] = {}
    run_tasks(iter(tasks), 2, lambda task, outcome: outcomes.__setitem__(task.video_id, outcome), _crash_on_second)
    assert set(outcomes) == {"a", "crash", "b", "c"}
    assert isinstance(outcomes["crash"], Failed) and "crashed" in outcomes["crash"].reason
    assert all(isinstance(outcomes[name], Decoded) for name in ("a", "b", "c"))


def test_sigkill_mid_ingest_leaves_a_readable_store_and_rerun_completes(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for index in range(40):
        write_video(source / f"clip{index:02d}.mp4", scan_frames(24, 64, 64, seed=index), fps=24)
    store_dir = tmp_path / "store"
    command = [
        sys.executable,
        "-m",
        "sonocl",
        "ingest",
        str(source),
        "--out",
        str(store_dir),
        "--size",
        "64",
        "--workers",
        "1",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    videos_file = store_dir / "videos.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if videos_file.exists() and videos_file.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "ingest finished before it could be killed"
    partial = FrameStore.open(store_dir)
    assert 3 <= partial.num_videos < 40
    committed = [video.id for video in partial.videos]
    assert subprocess.run(command, capture_output=True).returncode == 0
    store = FrameStore.open(store_dir)
    assert store.num_videos == 40 and store.num_frames == 40 * 24
    assert [video.id for video in store.videos[: len(committed)]] == committed
    assert sorted(video.id for video in store.videos) == [f"clip{index:02d}" for index in range(40)]
    assert not (store_dir / TEMP_DIR).exists()


def test_second_concurrent_ingest_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_video(tmp_path / "scan.mp4", scan_frames(3, 16, 16))
    with FrameStoreWriter(tmp_path / "store", 16):
        assert ingest(tmp_path / "scan.mp4", "--out", tmp_path / "store") == 2
    assert "another sonocl process is writing to this store" in capsys.readouterr().err
    assert FrameStore.open(tmp_path / "store").num_videos == 0


def test_dicom_identity_never_reaches_the_store_or_the_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    write_dicom(source / "cine1.dcm", scan_frames(4, 16, 16, seed=1), patient_name=PLANTED_NAME, patient_id=PLANTED_ID)
    write_dicom(source / "cine2.dcm", scan_frames(3, 16, 16, seed=2), patient_name=PLANTED_NAME, patient_id=PLANTED_ID)
    write_dicom(
        source / "other.dcm", scan_frames(3, 16, 16, seed=3), patient_name="Someone^Else", patient_id="PID-OTHER"
    )
    write_dicom(
        source / "report.dcm", scan_frames(1, 8, 8), patient_name=PLANTED_NAME, patient_id=PLANTED_ID, with_pixels=False
    )
    write_dicom(
        source / "malformed.dcm",
        scan_frames(2, 16, 16, seed=4),
        patient_name=PLANTED_NAME,
        patient_id=f"{PLANTED_ID}\x01",
    )
    capsys.readouterr()
    store_dir = tmp_path / "store"
    assert ingest(source, "--out", store_dir, "--size", "16") == 3
    assert main(["info", str(store_dir)]) == 0
    assert main(["info", str(store_dir), "--json"]) == 0
    captured = capsys.readouterr()
    secrets = [PLANTED_NAME, "Planted", "Patientname", PLANTED_ID, "7731", "19610203", "Someone", "PID-OTHER"]
    for path in [*store_dir.rglob("*")]:
        if path.is_file():
            content = path.read_bytes()
            for secret in secrets:
                assert secret.encode() not in content, (path, secret)
    for secret in secrets:
        assert secret not in captured.out and secret not in captured.err
    store = FrameStore.open(store_dir)
    groups = {video.id: video.group for video in store.videos}
    assert groups["cine1"] == groups["cine2"] == hashed_group(store.salt, PLANTED_ID)
    assert groups["other"] != groups["cine1"]


def test_csv_labels_groups_and_extra_columns(tmp_path: Path) -> None:
    source = tmp_path / "videos"
    source.mkdir()
    for index, name in enumerate(["a", "b", "c"]):
        write_video(source / f"{name}.mp4", scan_frames(3, 16, 16, seed=index))
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label,patient,anatomy\na,covid,p1,L1\nb,COVID,p1,\nc,,p2,R2\n")
    store_dir = tmp_path / "store"
    assert ingest(source, "--out", store_dir, "--size", "16", "--labels", csv, "--extra-columns", "anatomy") == 0
    store = FrameStore.open(store_dir)
    by_id = {video.id: video for video in store.videos}
    assert by_id["a"].label == by_id["b"].label == "covid" and by_id["c"].label is None
    assert by_id["a"].group == by_id["b"].group == hashed_group(store.salt, "p1")
    assert by_id["a"].extra_labels == {"anatomy": "L1"} and by_id["b"].extra_labels == {}
    assert b"p1" not in (store_dir / "videos.jsonl").read_bytes()


def test_class_folder_rule(tmp_path: Path) -> None:
    for seed, label in enumerate(("covid", "normal")):
        (tmp_path / "data" / label).mkdir(parents=True)
        Image.fromarray(scan_frames(1, 16, 16, seed=seed)[0]).save(tmp_path / "data" / label / "img.png")
        Image.fromarray(scan_frames(1, 20, 16, seed=seed)[0]).save(tmp_path / "data" / label / f"{label}_photo.jpg")
    assert ingest(tmp_path / "data", "--out", tmp_path / "store", "--size", "16", "--label-from-folder") == 0
    labels = {video.id: video.label for video in FrameStore.open(tmp_path / "store").videos}
    assert labels == {
        "covid/img": "covid",
        "covid/covid_photo": "covid",
        "normal/img": "normal",
        "normal/normal_photo": "normal",
    }


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--label-from-name", "cov"], "PREFIX=LABEL"),
        (["--size", "0"], "--size must be at least 8"),
        (["--id-column", "file"], "needs --labels"),
        (["--labels", "missing.csv"], "labels CSV not found"),
    ],
)
def test_usage_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    write_video(tmp_path / "scan.mp4", scan_frames(3, 16, 16))
    assert ingest(tmp_path / "scan.mp4", "--out", tmp_path / "store", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_missing_source_and_size_mismatch_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ingest(tmp_path / "nowhere", "--out", tmp_path / "store") == 2
    write_video(tmp_path / "scan.mp4", scan_frames(3, 16, 16))
    assert ingest(tmp_path / "scan.mp4", "--out", tmp_path / "store", "--size", "16") == 0
    assert ingest(tmp_path / "scan.mp4", "--out", tmp_path / "store", "--size", "32") == 2
    assert "use --size 16" in capsys.readouterr().err


def test_info_reports_labels_groups_and_skipped(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store_dir = tmp_path / "store"
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "broken.gif").write_bytes(b"GIF89a")
    assert ingest(tree, tmp_path / "junk", "--out", store_dir, "--size", "16", "--label-from-name", RULES) == 3
    capsys.readouterr()
    assert main(["info", str(store_dir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["videos"], summary["frames"], summary["size"]) == (6, 42, 16)
    assert summary["labels"] == {
        "regular": {"videos": 3, "frames": 21},
        "covid": {"videos": 1, "frames": 10},
        "pneumonia": {"videos": 1, "frames": 6},
        "viral": {"videos": 1, "frames": 5},
    }
    assert summary["groups"]["count"] == 6
    assert [Path(entry["file"]).name for entry in summary["skipped"]] == ["broken.gif"]
    assert summary["last_ingest"]["counts"] == {"added": 6, "already_present": 0, "skipped": 1}
    assert main(["info", str(store_dir)]) == 0
    text = capsys.readouterr().out
    assert "6 videos, 42 frames of 16×16" in text and "broken.gif" in text and "regular" in text


@pytest.mark.pocus
def test_pocus_videos_ingest_with_every_frame(pocus_dir: Path, tmp_path: Path) -> None:
    names = ["Cov-Atlas+(45).gif", "Reg_pat1Image_132943.mpeg", "Pneu_northumbria_0409_set1_vid1.avi"]
    files = [pocus_dir / "pocus_videos" / "convex" / name for name in names]
    assert ingest(*files, "--out", tmp_path / "store", "--size", "64", "--label-from-name", RULES, workers=2) == 0
    store = FrameStore.open(tmp_path / "store")
    import av

    for video in store.videos:
        with av.open(str(pocus_dir / "pocus_videos" / "convex" / video.source)) as container:
            assert video.num_frames == sum(1 for _ in container.decode(video=0))
    assert sorted(video.label or "" for video in store.videos) == ["covid", "pneumonia", "regular"]


def test_ingest_config_is_checked_when_built_and_names_the_option(tmp_path: Path) -> None:
    """The typed record of `sonocl ingest` (as pretrain's and segment's): a bad value is one ConfigError line naming
    the option, before any file is read; from Python as from the command line."""
    from sonocl.data.ingest_config import IngestConfig
    from sonocl.errors import ConfigError

    (tmp_path / "videos").mkdir()
    (tmp_path / "labels.csv").write_text("file,label,a,b\n")
    good = IngestConfig(
        sources=[tmp_path / "videos"], out=tmp_path / "store", labels=tmp_path / "labels.csv", extra_columns="a, b,"
    )
    assert good.sources == (tmp_path / "videos",) and good.extra_columns == ("a", "b") and good.workers >= 1
    for changes, message in (
        ({"stride": 0}, "--stride must be at least 1, not 0"),
        ({"frame_rate": float("nan")}, "--frame-rate must be positive and finite"),
        ({"extra_columns": ("a",)}, "--extra-columns needs --labels CSV"),
        ({"sources": [tmp_path / "nowhere"]}, "no such file or folder"),
        ({"crop": "square"}, "--crop must be one of auto, none"),
    ):
        with pytest.raises(ConfigError, match=message):
            IngestConfig(**{"sources": [tmp_path / "videos"], "out": tmp_path / "store", **changes})
