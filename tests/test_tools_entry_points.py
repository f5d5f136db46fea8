"""The tools are thin commands: each runs from any directory through the installed package."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOOLS = {
    "convert_checkpoint.py": ("sn_plugin.checkpoints.cli", "Convert SN-ResNet checkpoints"),
    "plot_sn_weights.py": ("sn_plugin.plotting", "Plot every SN layer's importance weights"),
    "train.py": ("sn_plugin.integrations.openmmlab.train", "--cfg-options"),
    "train_net_d2.py": ("sn_plugin.integrations.detectron2.train_net", "--num-processes"),
    "lazyconfig_train_net_d2.py": ("sn_plugin.integrations.detectron2.lazy_train_net", "--eval-only"),
}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_tool_is_an_entry_point_of_an_importable_command(tool, tmp_path):
    module, help_text = TOOLS[tool]
    if tool.endswith("_d2.py"):
        pytest.importorskip("detectron2")
    if tool == "train.py":
        pytest.importorskip("mmcv")
    with open(os.path.join(REPO, "tools", tool)) as f:
        source = f.read()
    assert f"from {module} import main" in source and "sys.path" not in source
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", tool), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    assert help_text in result.stdout
