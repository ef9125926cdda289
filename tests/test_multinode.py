"""Multi-node, simulated on this machine: two torchrun launchers as two nodes of two gloo processes each (4 ranks,
localhost rendezvous) train USCL, Meta-USCL and MoCo v2 to the loss trajectory and weights of one process at the
same global batch, as the 2-process tests do for one node (tests/test_train.py, tests/test_meta_ddp.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import IDENTITY_AUGMENT, _env, _step_rows

NODES, PER_NODE = 2, 2
METHODS = {
    "uscl": (["--label-rate", "0.5"], [], []),
    "meta-uscl": (["--meta-batch-size", "4"], [], []),
    # Shuffle-BN: one process emulates the 4 ranks' sub-batches with 4 groups; each rank encodes its own shard
    "moco": (["--queue-size", "16"], ["--shuffle-bn-groups", "4"], ["--shuffle-bn-groups", "1"]),
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("method", list(METHODS))
def test_two_nodes_of_two_processes_match_one_process(method: str, phantom_store, tmp_path: Path) -> None:
    options, one_only, nodes_only = METHODS[method]
    common = ["--store", str(phantom_store.root), "--method", method, *options, "--steps", "3", "--batch-size", "8",
              "--size", "32", "--precision", "fp32", "--workers", "0", "--device", "cpu", "--no-progress",
              "--threads", "1", "--set", "options.items=videos", "--set", "model.freeze_bn=true",
              "--set", "model.projection_hidden=64", "--set", "knn_frames_per_video=1", *IDENTITY_AUGMENT]  # fmt: skip
    torchrun, port = Path(sys.executable).with_name("torchrun"), _free_port()
    nodes = [
        subprocess.Popen(
            [
                str(torchrun),
                "--nnodes",
                str(NODES),
                "--node-rank",
                str(node),
                "--nproc-per-node",
                str(PER_NODE),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                "-m",
                "sonocl",
                "pretrain",
                *common,
                *nodes_only,
                "--out",
                str(tmp_path / "nodes"),
            ],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for node in range(NODES)
    ]
    one = subprocess.run(
        [sys.executable, "-m", "sonocl", "pretrain", *common, *one_only, "--out", str(tmp_path / "one")],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert one.returncode == 0, one.stderr
    assert all(node.returncode == 0 for node in nodes), outputs
    assert "4 processes" in outputs[0]
    rows_one, rows_nodes = _step_rows(tmp_path / "one"), _step_rows(tmp_path / "nodes")
    assert len(rows_one) == len(rows_nodes) == 3
    for a, b in zip(rows_one, rows_nodes):
        assert abs(float(a["loss"]) - float(b["loss"])) < 1e-4, (a["loss"], b["loss"])
    weights_one, weights_nodes = (
        torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=True)["model"] for run in ("one", "nodes")
    )
    for key, value in weights_one.items():
        torch.testing.assert_close(weights_nodes[key], value, rtol=1e-4, atol=1e-5)
