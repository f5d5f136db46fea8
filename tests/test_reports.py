"""sn_plugin.reports: seed summaries, tables and the pictures the training reports and benchmarks draw."""
import numpy as np
import pytest

from sn_plugin import reports


def test_mean_and_spread_over_seeds_skips_missing_values():
    summary = reports.mean_and_spread([10.0, None, 14.0, float("nan"), 12.0])
    assert summary["n"] == 3 and summary["mean"] == 12.0 and summary["std"] == pytest.approx(2.0)
    assert (summary["min"], summary["max"]) == (10.0, 14.0)
    assert reports.format_mean_spread(summary) == "12.0 ± 2.0"
    one = reports.mean_and_spread([7.25])
    assert one["std"] is None and reports.format_mean_spread(one) == "7.2"  # no spread from a single seed
    assert reports.format_mean_spread(reports.mean_and_spread([None])) == "n/a"


def test_markdown_table():
    assert reports.markdown_table(["a", "b"], [[1, 2.5]]) == "| a | b |\n|---|---|\n| 1 | 2.5 |\n"


def test_draw_objects_scales_tints_and_outlines():
    image = np.full((32, 64, 3), 100, dtype=np.uint8)
    mask = np.zeros((32, 64), dtype=bool)
    mask[4:28, 8:56] = True
    plain = np.asarray(reports.draw_objects(image, [], ["thing"], show_scores=False, display_side=128))
    drawn = np.asarray(reports.draw_objects(image, [(0, 0.9, [8, 4, 48, 24], mask)], ["thing"], show_scores=True,
                                            display_side=128))
    assert plain.shape == drawn.shape == (64, 128, 3)  # the longer side scaled to 128
    assert (plain == 100).all()
    inside = drawn[36:44, 40:80]  # a part of the mask far from the box edge and its label
    assert np.allclose(inside, 0.45 * 100 + 0.55 * np.array(reports.PALETTE[0]), atol=1)
    ignored = np.asarray(reports.draw_objects(image, [(None, 1.0, [8, 4, 48, 24], mask)], ["thing"],
                                              show_scores=False, display_side=128))
    assert np.allclose(ignored[36:44, 40:80], 0.45 * 100 + 0.55 * np.array(reports.IGNORED_COLOUR), atol=1)


def test_image_grid_and_training_curve_are_written(tmp_path):
    from PIL import Image

    pictures = [[Image.new("RGB", (40, 30)), Image.new("RGB", (40, 20))], [Image.new("RGB", (40, 30))]]
    reports.save_image_grid(pictures, ["left", "right"], str(tmp_path / "grid.png"))
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (2 * 40 + 6, 18 + 30 + 6 + 30)
    rows = [{"step": step, "loss": 2.0 / step, "loss_cls": 1.0 / step, "lr": 0.02} for step in range(1, 6)]
    reports.plot_training_curve(rows, str(tmp_path / "curve.png"), "title")
    assert (tmp_path / "curve.png").stat().st_size > 0
    with pytest.raises(ValueError, match="no training losses"):
        reports.plot_training_curve([{"step": 1, "lr": 0.1}], str(tmp_path / "empty.png"), "title")


def test_machine_record_names_versions_and_command():
    record = reports.machine_record(("numpy", "surely_not_installed_package"))
    assert record["versions"]["numpy"] == np.__version__
    assert record["versions"]["surely_not_installed_package"] == "not installed"
    assert record["cpu_count"] >= 1 and record["command"] and record["platform"]
