"""Label rules: file-name prefixes, class sub-folders, CSV joins with column detection, group hashing."""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath

import pytest

from sonocl.data.labels import (
    LabelError,
    LabelTable,
    hashed_group,
    label_from_folder,
    label_from_name,
    parse_name_rules,
)

POCUS_RULES = "cov=covid,pneu=pneumonia,reg=regular,vir=viral"


def test_name_rules_are_case_insensitive_prefixes_longest_first() -> None:
    rules = parse_name_rules("pneu=pneumonia, p=other ,cov=covid")
    assert label_from_name("Pneu_Avi_Video_001.mp4", rules) == "pneumonia"
    assert label_from_name("pneu-radiopaeda.mp4", rules) == "pneumonia"
    assert label_from_name("Patient7.mp4", rules) == "other"
    assert label_from_name("COV-Atlas.gif", rules) == "covid"
    assert label_from_name("Reg_scan.mp4", rules) is None


@pytest.mark.parametrize("spec", ["cov", "cov=", "=covid", "cov=covid,,reg=regular"])
def test_malformed_name_rules_are_refused(spec: str) -> None:
    with pytest.raises(LabelError, match="PREFIX=LABEL"):
        parse_name_rules(spec)


def test_class_sub_folder_rule() -> None:
    assert label_from_folder(PurePosixPath("covid/scan1.png")) == "covid"
    assert label_from_folder(PurePosixPath("covid/patient3/clip")) == "covid"
    assert label_from_folder(PurePosixPath("scan1.png")) is None


def test_group_hash_is_salted_and_never_the_value() -> None:
    group = hashed_group("salt", "PID-42")
    assert group == "p-" + hashlib.sha256(b"saltPID-42").hexdigest()[:16]
    assert "PID-42" not in group
    assert hashed_group("other salt", "PID-42") != group


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_join_detects_id_label_and_patient_columns(tmp_path: Path) -> None:
    csv = _write(
        tmp_path / "meta.csv",
        "Date,Filename,Label,Patient ID / Name,Comments about patient,Anatomy\n"
        "1.1.20,Cov_scan1,COVID-19,p7,cough,L1\n"
        "1.1.20,Reg_scan2,regular,,none,R2\n"
        "1.1.20,Reg_scan3,Regular,p9,none,\n"
        "1.1.20,Reg_scan4,regular,p9,none,R1\n",
    )
    sources = [
        PurePosixPath(name) for name in ("convex/Cov_scan1.mp4", "Reg_scan2.avi", "linear/Reg_scan3.gif", "other.mp4")
    ]
    table = LabelTable.load(csv, sources, extra_columns=["Anatomy"])
    assert (table.id_column, table.label_column, table.group_column) == ("Filename", "Label", "Patient ID / Name")
    first = table.lookup(sources[0])
    assert first is not None and first.label == "COVID-19" and first.group == "p7" and first.extra == {"Anatomy": "L1"}
    second = table.lookup(sources[1])
    assert second is not None and second.group is None
    third = table.lookup(sources[2])
    assert third is not None and third.label == "regular" and third.extra == {}
    assert table.lookup(sources[3]) is None


def test_csv_matches_relative_paths_and_file_names_with_extension(tmp_path: Path) -> None:
    csv = _write(tmp_path / "labels.csv", "video;class;subject\nsite1/a.mp4;x;s1\nB.MP4;y;s2\n")
    sources = [PurePosixPath("site1/a.mp4"), PurePosixPath("site2/b.mp4")]
    table = LabelTable.load(csv, sources)
    assert table.id_column == "video" and table.group_column == "subject"
    assert [table.lookup(source).label for source in sources] == ["x", "y"]  # type: ignore[union-attr]


def test_csv_columns_named_on_the_command_line_are_used_and_checked(tmp_path: Path) -> None:
    csv = _write(tmp_path / "labels.csv", "name,finding,site\nscan,b-lines,north\n")
    table = LabelTable.load(
        csv, [PurePosixPath("scan.mp4")], id_column="name", label_column="finding", group_column="site"
    )
    row = table.lookup(PurePosixPath("scan.mp4"))
    assert row is not None and row.label == "b-lines" and row.group == "north"
    with pytest.raises(LabelError, match="'Label' is not a column"):
        LabelTable.load(csv, [PurePosixPath("scan.mp4")], label_column="Label")
    with pytest.raises(LabelError, match="no label column"):
        LabelTable.load(csv, [PurePosixPath("scan.mp4")], id_column="name")
    with pytest.raises(LabelError, match="anatomy"):
        LabelTable.load(csv, [PurePosixPath("scan.mp4")], label_column="finding", extra_columns=["anatomy"])


def test_csv_without_a_column_naming_the_files_is_refused(tmp_path: Path) -> None:
    csv = _write(tmp_path / "labels.csv", "id,label\n1,covid\n")
    with pytest.raises(LabelError, match="--id-column"):
        LabelTable.load(csv, [PurePosixPath("scan.mp4")])


@pytest.mark.pocus
def test_pocus_metadata_names_every_video(pocus_dir: Path) -> None:
    videos = sorted(path for path in (pocus_dir / "pocus_videos").rglob("*") if path.is_file())
    relatives = [PurePosixPath(path.relative_to(pocus_dir / "pocus_videos").as_posix()) for path in videos]
    table = LabelTable.load(pocus_dir / "dataset_metadata.csv", relatives)
    assert (table.id_column, table.label_column, table.group_column) == ("Filename", "Label", "Patient ID / Name")
    rows = [table.lookup(relative) for relative in relatives]
    assert all(row is not None for row in rows)
    labels = {row.label for row in rows if row is not None}
    assert "regular" in labels and "Regular" not in labels
    rules = parse_name_rules(POCUS_RULES)
    by_name = [label_from_name(relative.name, rules) for relative in relatives]
    assert (
        by_name.count("covid") + by_name.count("pneumonia") + by_name.count("regular") + by_name.count("viral") == 131
    )
