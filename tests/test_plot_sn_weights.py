"""tools/plot_sn_weights.py (sn_plugin.plotting.main) and sn_plugin.plotting: the paper's Fig. 7 (issue 4)."""
import csv
import hashlib
import os
import sys

import pytest
import torch
from torch import nn

from sn_plugin import SwitchNorm2d, importance_weights
from sn_plugin.plotting import (
    importance_weights_from_state_dict, main, plot_importance_weights, write_importance_csv,
)


class Backbone(nn.Module):
    """Names like an OpenMMLab ResNet: a stem norm and two stages of blocks."""

    def __init__(self):
        super().__init__()
        self.sn1 = SwitchNorm2d(4)
        self.layer1 = nn.ModuleList([nn.ModuleDict({"sn1": SwitchNorm2d(4), "sn2": SwitchNorm2d(4)})
                                     for _ in range(2)])
        self.layer2 = nn.ModuleList([nn.ModuleDict({"sn1": SwitchNorm2d(4, using_bn=False)})])


def build_model():
    torch.manual_seed(0)
    model = nn.Module()
    model.backbone = Backbone()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SwitchNorm2d):
                m.mean_weight.normal_()
                m.var_weight.normal_()
    return model


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_csv_matches(rows, model):
    expected = importance_weights(model)
    assert [r["layer"] for r in rows] == list(expected)
    for row in rows:
        mean_w, var_w = expected[row["layer"]]
        for kind, w in (("mean", mean_w), ("var", var_w)):
            values = [row[f"{kind}_{b}"] for b in ("IN", "LN", "BN")][: w.numel()]
            assert [float(v) for v in values] == pytest.approx(w.tolist(), abs=1e-7)
            if w.numel() == 2:
                assert row[f"{kind}_BN"] == ""
    assert rows[1]["stage"] == "backbone.layer1" and rows[0]["stage"] == "backbone"


def test_checkpoint_to_png_and_csv(tmp_path):
    model = build_model()
    ckpt = tmp_path / "epoch_1.pth"
    # mmengine-style: a 'state_dict' with DDP's 'module.' prefixes and a 'meta' of other objects
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()},
                "meta": {"epoch": 1, "cfg": "..."}}, ckpt)
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    out = tmp_path / "figs" / "weights.png"
    main([str(ckpt), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert_csv_matches(read_csv(tmp_path / "figs" / "weights.csv"), model)
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest  # the checkpoint is only read
    assert sorted(os.listdir(tmp_path / "figs")) == ["weights.csv", "weights.png"]  # no temporary files left


def test_model_builder_source(tmp_path, monkeypatch):
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    (tmp_path / "my_models.py").write_text(
        f"import sys\nsys.path.insert(0, {tests_dir!r})\nfrom test_plot_sn_weights import build_model\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    main(["my_models:build_model", "--out", "w.svg", "--csv", "numbers.csv"])
    assert str(tmp_path) not in sys.path  # the current directory was on the path only for the import
    assert (tmp_path / "w.svg").read_text().lstrip().startswith("<?xml")
    assert_csv_matches(read_csv(tmp_path / "numbers.csv"), build_model())


def test_detectron2_checkpoint_with_numpy_arrays():
    model = build_model()
    checkpoint = {"model": {k: v.numpy() for k, v in model.state_dict().items()}, "__author__": "d2"}
    weights = importance_weights_from_state_dict(checkpoint)
    for name, (mean_w, var_w) in importance_weights(model).items():
        torch.testing.assert_close(weights[name][0], mean_w)
        torch.testing.assert_close(weights[name][1], var_w)


def test_figure_bars_are_the_weights_grouped_by_stage():
    model = build_model()
    figure = plot_importance_weights(model, title="t")
    mean_ax, var_ax = figure.axes[:2]
    weights = list(importance_weights(model).values())
    heights = [p.get_height() for p in var_ax.patches]  # bar containers in branch order: IN, LN, BN
    n = len(weights)
    assert heights[:n] == pytest.approx([w[1][0].item() for w in weights], abs=1e-6)
    assert heights[2 * n:3 * n] == pytest.approx([w[1][2].item() if w[1].numel() == 3 else 0.0
                                                  for w in weights], abs=1e-6)
    stage_labels = [t.get_text() for t in mean_ax.texts]
    assert stage_labels == ["backbone", "layer1", "layer2"]
    assert [t.get_text() for t in var_ax.get_xticklabels()] == ["sn1", "0.sn1", "0.sn2", "1.sn1", "1.sn2", "0.sn1"]


def test_csv_from_a_weights_mapping(tmp_path):
    model = build_model()
    write_importance_csv(importance_weights(model), str(tmp_path / "w.csv"))
    assert_csv_matches(read_csv(tmp_path / "w.csv"), model)


def test_bad_sources_give_clear_errors(tmp_path, capsys):
    bn_ckpt = tmp_path / "bn.pth"
    torch.save(nn.Sequential(nn.BatchNorm2d(3)).state_dict(), bn_ckpt)
    with pytest.raises(SystemExit, match="no SN importance logits found"):
        main([str(bn_ckpt), "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="neither an existing checkpoint file nor 'module:callable'"):
        main([str(tmp_path / "missing.pth"), "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="cannot load 'no_such_module:build'"):
        main(["no_such_module:build", "--out", str(tmp_path / "x.png")])
    with pytest.raises(ValueError, match="no Switchable Normalization layers"):
        plot_importance_weights(nn.Conv2d(3, 3, 1))
    broken = {"a.mean_weight": torch.zeros(3)}
    with pytest.raises(ValueError, match="'a': expected a.mean_weight and a.var_weight"):
        importance_weights_from_state_dict(broken)
    assert not (tmp_path / "x.png").exists()


def test_unindexed_layers_are_grouped_under_their_parent_and_long_labels_fit():
    w = (torch.tensor([0.2, 0.3, 0.5]), torch.tensor([0.1, 0.1, 0.8]))
    names = ["backbone.fpn_lateral2.norm", "backbone.fpn_output2.norm", "backbone.bottom_up.stem.conv1.norm"]
    names += [f"backbone.bottom_up.res2.{i}.conv{j}.norm" for i in range(3) for j in range(1, 4)]
    names.insert(3, "backbone.bottom_up.res2.0.shortcut.norm")
    names += [f"roi_heads.box_head.conv{i}.norm" for i in range(1, 5)]
    figure = plot_importance_weights({name: w for name in names})
    labels = [t.get_text() for t in figure.axes[0].texts]
    # a single bar has room for the last name component only; wider groups may wrap at a dot
    assert [label.replace("\n", "") for label in labels] == [
        "backbone", "stem", "backbone.bottom_up.res2", "roi_heads.box_head"]
    ticks = [t.get_text() for t in figure.axes[1].get_xticklabels()]
    assert ticks[:4] == ["fpn_lateral2.norm", "fpn_output2.norm", "conv1.norm", "0.shortcut.norm"]
    assert ticks[-1] == "conv4.norm"
    hatched = [bool(p.get_hatch()) for p in figure.axes[1].patches[:len(names)]]
    assert hatched == [name.endswith("shortcut.norm") for name in names]
    assert "shortcut" in [t.get_text() for t in figure.axes[0].get_legend().get_texts()]


def test_written_files_get_the_umask_permissions_not_mkstemps_private_ones(tmp_path):
    from sn_plugin.atomic import current_umask
    from sn_plugin.plotting import write_importance_csv

    path = tmp_path / "weights.csv"
    write_importance_csv({"layer1.0.sn1": (torch.ones(3) / 3, torch.ones(3) / 3)}, str(path))
    assert path.read_text().startswith("layer,stage")
    assert (path.stat().st_mode & 0o777) == 0o666 & ~current_umask()
