"""Multi-process training through the OpenMMLab train command (tools/train.py) under torchrun, on CPU.

2 processes (gloo) with 1 image each must train exactly as 1 process with both images: the
config's SyncSN layers synchronise their batch statistics, and the command starts the gloo
process group and wraps the model without device_ids, which mmengine 0.10 cannot do on CPU
(see sn_plugin/integrations/openmmlab/train.py). torchrun runs in a subprocess, so the real
launcher path is tested.
"""
import glob
import os
import sys

import pytest
import torch

pytest.importorskip("mmcv")

from mmengine.config import Config  # noqa: E402

from multiprocess_utils import (  # noqa: E402
    REPO, assert_resumed, assert_two_processes_agree_with_one, records, run, torchrun,
)
from sn_plugin.integrations.openmmlab import prepare_cpu_distributed  # noqa: E402
from sn_plugin.integrations.openmmlab.train import load_config, parse_args  # noqa: E402

TRAIN = os.path.join(REPO, "tools", "train.py")

CONFIG = """
custom_imports = dict(imports=['sn_plugin.integrations.openmmlab', 'multiprocess_toy_openmmlab'],
                      allow_failed_imports=False)
model = dict(type='SNToyClassifier', norm_cfg=dict(type='SyncSN'))
train_dataloader = dict(batch_size=2, num_workers=0, sampler=dict(type='DefaultSampler', shuffle=False),
                        collate_fn=dict(type='default_collate'), dataset=dict(type='SNToyImages'))
train_cfg = dict(type='IterBasedTrainLoop', max_iters=2)
optim_wrapper = dict(constructor='SNOptimWrapperConstructor', optimizer=dict(type='SGD', lr=0.1, momentum=0.9))
custom_hooks = [dict(type='SNBatchStatsHook', num_batches=1), dict(type='SNRecordHook')]
default_hooks = dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=2),
                     logger=dict(type='LoggerHook', interval=1))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
env_cfg = dict(dist_cfg=dict(backend='nccl'))  # the toolkits' usual setting; on CPU the command takes gloo
"""


def test_two_cpu_processes_train_like_one_with_the_whole_batch_and_resume(tmp_path):
    config = tmp_path / "toy_sync_sn.py"
    config.write_text(CONFIG)
    single, pair = str(tmp_path / "single"), str(tmp_path / "pair")
    run([sys.executable, TRAIN, str(config), "--work-dir", single], cwd=str(tmp_path))
    output = run(torchrun(2, TRAIN, str(config), "--launcher", "pytorch", "--work-dir", pair,
                          "--cfg-options", "train_dataloader.batch_size=1"), cwd=str(tmp_path))
    assert "process 0 of 2 trains on CPU (gloo" in output

    assert_two_processes_agree_with_one(records(single), records(pair))

    # One checkpoint, written by rank 0 only.
    assert [r["checkpoints_written"] for r in records(pair)] == [1, 0]
    assert [os.path.basename(p) for p in glob.glob(os.path.join(pair, "*.pth"))] == ["iter_2.pth"]

    # --resume continues from it in both processes: its iteration, weights, statistics and optimizer state.
    run(torchrun(2, TRAIN, str(config), "--launcher", "pytorch", "--work-dir", pair, "--resume",
                 "--cfg-options", "train_dataloader.batch_size=1", "train_cfg.max_iters=3"), cwd=str(tmp_path))
    checkpoint = torch.load(os.path.join(pair, "iter_2.pth"), weights_only=False)
    assert checkpoint["meta"]["iter"] == 2
    assert_resumed(records(pair, start_iter=2), checkpoint["state_dict"], checkpoint["optimizer"], start_iter=2,
                   iterations_done=3)
    assert os.path.exists(os.path.join(pair, "iter_3.pth"))


def test_without_a_launcher_nothing_is_prepared():
    cfg = Config(dict(launcher="none"))
    assert prepare_cpu_distributed(cfg) is False and "model_wrapper_cfg" not in cfg


@pytest.mark.parametrize("launcher", ["slurm", "mpi"])
def test_slurm_and_mpi_on_cpu_say_to_start_torchrun(launcher, monkeypatch):
    monkeypatch.setattr("sn_plugin.integrations.openmmlab.train.get_device", lambda: "cpu")
    with pytest.raises(RuntimeError, match=rf"--launcher {launcher}: no GPU is visible.*srun torchrun"):
        prepare_cpu_distributed(Config(dict(launcher=launcher)))



def test_the_command_line_reaches_the_config(tmp_path):
    """The toolkits' options, and sn_plugin:: bases (the command imports the adapter before reading the config)."""
    pytest.importorskip("mmdet")
    config = tmp_path / "my_faster_rcnn.py"
    config.write_text("_base_ = 'sn_plugin::mmdet/faster-rcnn_r50_fpn_sn-all_1x_coco.py'\n")
    cfg = load_config(parse_args([str(config), "--resume", "--amp", "--auto-scale-lr",
                                  "--cfg-options", "train_cfg.max_epochs=3"]))
    assert cfg.model.backbone.norm_cfg.type == "SN" and cfg.train_cfg.max_epochs == 3
    assert cfg.work_dir == os.path.join("work_dirs", "my_faster_rcnn") and cfg.launcher == "none"
    assert cfg.resume is True and cfg.load_from is None
    assert cfg.optim_wrapper.type == "AmpOptimWrapper" and cfg.auto_scale_lr.enable is True
    cfg = load_config(parse_args([str(config), "--work-dir", "out", "--resume", "out/iter_8.pth"]))
    assert cfg.work_dir == "out" and cfg.load_from == "out/iter_8.pth"

    bare = tmp_path / "bare.py"
    bare.write_text("model = dict(type='SNToyClassifier')\n")
    with pytest.raises(ValueError, match="has no auto_scale_lr"):
        load_config(parse_args([str(bare), "--auto-scale-lr"]))
