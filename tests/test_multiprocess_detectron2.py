"""Multi-process training through detectron2's train command (tools/train_net_d2.py) on CPU:
``--num-processes 2`` starts 2 processes that talk over gloo.

2 processes with 1 image each must train exactly as 1 process with both images (SyncSN layers
in detectron2's ResNet synchronise their batch statistics; SOLVER.IMS_PER_BATCH is the total
batch, as in detectron2). The command runs in a subprocess, so the real launch path is tested:
spawned processes, detectron2's per-machine process group, DistributedDataParallel without
device_ids (see sn_plugin/integrations/detectron2/launch.py).
"""
import glob
import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")

from PIL import Image  # noqa: E402

from multiprocess_utils import (  # noqa: E402
    TESTS, assert_resumed, assert_two_processes_agree_with_one, records, run,
)
from sn_plugin.integrations.detectron2 import train_net  # noqa: E402

SCRIPT = os.path.join(TESTS, "multiprocess_toy_detectron2.py")

OPTIONS = [
    "MODEL.META_ARCHITECTURE", "SNToyClassifier",
    "MODEL.WEIGHTS", "",
    "MODEL.BACKBONE.FREEZE_AT", 0,
    "MODEL.RESNETS.NORM", "SyncSN",
    "MODEL.RESNETS.OUT_FEATURES", "['res5']",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", 8,
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 16,
    "MODEL.RESNETS.WIDTH_PER_GROUP", 4,
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", 64,
    "INPUT.RANDOM_FLIP", "none",
    "DATASETS.TRAIN", "('sn_multiprocess_toy',)",
    "DATASETS.TEST", "()",
    "DATALOADER.NUM_WORKERS", 0,
    "SOLVER.IMS_PER_BATCH", 2,
    "SOLVER.BASE_LR", 0.01,
    "SOLVER.MAX_ITER", 2,
    "SOLVER.CHECKPOINT_PERIOD", 1000,
    "TEST.SN_BATCH_STATS.ENABLED", True,
    "TEST.SN_BATCH_STATS.NUM_ITER", 1,
    "SEED", 0,
]


def _train(tmp_path, output: str, *arguments: str) -> str:
    return run([sys.executable, SCRIPT, "--config-file", str(tmp_path / "config.yaml"), "--dist-url", "auto",
                *arguments, *map(str, OPTIONS), "OUTPUT_DIR", output], cwd=str(tmp_path))


def test_two_cpu_processes_train_like_one_with_the_whole_batch_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("SN_TOY_IMAGES", str(tmp_path))
    generator = np.random.default_rng(0)
    for label in range(2):
        Image.fromarray(generator.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"{label}.png")
    (tmp_path / "config.yaml").write_text("VERSION: 2\n")  # detectron2's defaults: a ResNet-50 backbone
    single, pair = str(tmp_path / "single"), str(tmp_path / "pair")
    _train(tmp_path, single, "--num-processes", "1")
    output = _train(tmp_path, pair, "--num-processes", "2")
    assert "Rank of current process: 0. World size: 2" in output

    assert_two_processes_agree_with_one(records(single), records(pair))

    # One checkpoint, written by rank 0 only.
    assert [r["checkpoints_written"] for r in records(pair)] == [1, 0]
    assert [os.path.basename(p) for p in glob.glob(os.path.join(pair, "*.pth"))] == ["model_final.pth"]

    # --resume continues from it in both processes: its iteration, weights, statistics and optimizer state
    # (detectron2 0.6's DefaultTrainer saves no optimizer state; SNTrainer adds it).
    checkpoint = torch.load(os.path.join(pair, "model_final.pth"), weights_only=False)
    assert checkpoint["iteration"] == 1
    _train(tmp_path, pair, "--num-processes", "2", "--resume", "SOLVER.MAX_ITER", "3")
    optimizer = checkpoint["trainer"].get("_trainer", {}).get("optimizer", {"state": {}})
    assert_resumed(records(pair, start_iter=2), checkpoint["model"], optimizer, start_iter=2, iterations_done=3)


@pytest.mark.parametrize("argv, message", [
    (["--num-gpus", "2", "--num-processes", "2"], "exclude each other"),
    (["--num-processes", "-1"], "must be positive"),
])
def test_contradicting_process_counts_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        train_net.main(argv)
    assert message in capsys.readouterr().err


def test_more_gpus_than_visible_point_to_num_processes(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        train_net.main(["--num-gpus", "2"])
    assert "use --num-processes 2" in capsys.readouterr().err


def test_num_processes_refuses_a_gpu_device_on_the_command_line(tmp_path):
    (tmp_path / "config.yaml").write_text("VERSION: 2\n")  # detectron2's defaults: a ResNet-50 backbone
    args = train_net.argument_parser().parse_args(
        ["--num-processes", "1", "--config-file", str(tmp_path / "config.yaml"), "MODEL.DEVICE", "cuda"])
    with pytest.raises(ValueError, match="--num-processes trains on CPU"):
        train_net.setup(args)
