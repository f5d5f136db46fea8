"""tools/convert_checkpoint.py (sn_plugin.checkpoints.cli): arguments, summary, exit status, progress bar."""
import os

import pytest
import torch

from sn_plugin.checkpoints import cli
from test_checkpoints_fixtures import ReleasedResNetV1, released_checkpoint


@pytest.fixture(scope="module")
def released_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("released") / "resnet50v1_sn.pth"
    torch.save(released_checkpoint(ReleasedResNetV1(50, using_bn=False)), path)
    return str(path)


def test_cli_converts_and_prints_the_summary(released_file, tmp_path, capsys):
    out = str(tmp_path / "sn_r50_d2.pkl")
    assert cli.main(["released", "detectron2", released_file, out, "--progress", "on"]) == 0
    printed = capsys.readouterr()
    # 53 convs + 53 SN layers x (weight, bias, mean_weight, var_weight): no statistics without BN
    assert "released -> detectron2 (ResNet-50): 265 tensors mapped, 3 dropped, 0 missing" in printed.out
    assert "dropped  module.fc.weight" in printed.out
    assert "using_bn=False" in printed.out
    assert "-> detectron2" in printed.err  # the progress bar
    assert os.path.isfile(out)


def test_cli_inflation_options(released_file, tmp_path, capsys):
    out = tmp_path / "i3d.pth"
    argv = ["released", "mmaction2", released_file, str(out), "--conv1-kernel-t", "3", "--inflate-style", "3x3x3",
            "--inflate", "0,0,0;1,1,1,1;0,0,0,0,0,0;1,1,1", "--progress", "off"]
    assert cli.main(argv) == 0
    state = torch.load(out)["state_dict"]
    assert state["conv1.conv.weight"].shape[2] == 3
    assert state["layer2.3.conv2.conv.weight"].shape == (128, 128, 3, 3, 3)
    assert state["layer1.0.conv2.conv.weight"].shape == (64, 64, 1, 3, 3)
    with pytest.raises(SystemExit):
        cli.main(["released", "mmaction2", released_file, str(out), "--inflate", "1,x"])


def test_cli_bad_input_exits_1_with_a_message(released_file, tmp_path, capsys):
    assert cli.main(["released", "mmdet", released_file, str(tmp_path / "o.pth"), "--depth", "101"]) == 1
    assert "error: depth mismatch" in capsys.readouterr().err
    assert cli.main(["torchvision", "mmdet", released_file, str(tmp_path / "o.pth")]) == 1
    assert "--from-bn" in capsys.readouterr().err
    assert cli.main(["torchvision", "mmdet", released_file, str(tmp_path / "o.pth"), "--from-bn",
                     "--bn-start-weight", "1"]) == 1
    assert "bn_start_weight must lie in (1/3, 1)" in capsys.readouterr().err
    assert not (tmp_path / "o.pth").exists()
