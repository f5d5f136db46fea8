"""scripts/setup_env.sh as a newcomer lives it, without downloading or building anything.

Each test runs the real script against a throwaway venv whose ``pip`` is a fake: it
records its arguments, "installs" stub packages (a torch whose torchvision.ops.nms
answers, an mmcv with ``_ext``, the toolkits) and fails on request with the output a
real failure prints. What is checked is the script's own behaviour: the steps it runs,
what it says when one fails, and that a failed run is never taken for a finished one.
The console filter (scripts/setup_progress.py) is tested on canned pip -v output.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "setup_env.sh"
sys.path.insert(0, str(REPO / "scripts"))
import setup_progress  # noqa: E402

FAKE_PIP = r'''
import json, os, shutil, sys
from pathlib import Path

args = [a for a in sys.argv[1:] if a != "-v"]
with open(os.environ["FAKE_PIP_CALLS"], "a") as calls:
    calls.write(json.dumps(sys.argv[1:]) + "\n")
site = Path(__file__).resolve().parents[1]
STUBS = {
    "torch/__init__.py": "__version__ = '2.13.0'\n"
                         "class _Tensor(list):\n    def tolist(self):\n        return list(self)\n"
                         "def tensor(values):\n    return _Tensor(values)\n",
    "torchvision/__init__.py": "__version__ = '0.28.0'\nfrom . import ops\n",
    "torchvision/ops.py": "import torch\ndef nms(boxes, scores, threshold):\n    return torch.tensor([0, 2])\n",
    "mmcv/__init__.py": "__version__ = '2.1.0'\n",
    "mmcv/_ext.py": "",
}
TOOLKITS = ["mmengine", "mmdet", "mmseg", "mmpretrain", "mmaction", "pycocotools", "detectron2", "pytest"]


def stub(path):
    (site / path).parent.mkdir(parents=True, exist_ok=True)
    (site / path).write_text(STUBS.get(path, ""))


if sys.argv[1:] == ["--version"]:
    print("pip 0.0 (fake)")
    sys.exit(0)
joined = " ".join(args)
if os.environ.get("FAKE_PIP_FAIL") and os.environ["FAKE_PIP_FAIL"] in joined and args[0] == "install":
    print(os.environ.get("FAKE_PIP_OUTPUT", "ERROR: failed"))
    sys.exit(1)
if args[0] == "install":
    if "torch==" in joined:
        for path in ("torch/__init__.py", "torchvision/__init__.py", "torchvision/ops.py"):
            stub(path)
    if "mmcv" in args:
        stub("mmcv/__init__.py")
        if not os.environ.get("FAKE_MMCV_WITHOUT_OPS"):
            stub("mmcv/_ext.py")
    if any(a.startswith(".[") for a in args):  # the editable project, and what its extras bring
        if not os.environ.get("FAKE_PIP_FORGETS_PROJECT"):
            (site / "sn_plugin_editable.pth").write_text(os.getcwd() + "\n")
        for name in TOOLKITS if ".[all]" in args else ["pytest"]:
            stub(name + "/__init__.py")
    print("Successfully installed (fake)")
elif args[0] == "uninstall":
    for name in args[1:]:
        shutil.rmtree(site / name, ignore_errors=True)
'''


@pytest.fixture
def setup(tmp_path):
    """run(**env) runs setup_env.sh against a fresh fake venv; returns (result, pip calls so far)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = venv.glob("lib/python*/site-packages")
    (site / "pip").mkdir()
    (site / "pip" / "__init__.py").write_text("")
    (site / "pip" / "__main__.py").write_text(FAKE_PIP)
    calls = tmp_path / "pip_calls.jsonl"
    calls.touch()
    log = tmp_path / "setup.log"

    def run(**env):
        base = {
            "PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHON": sys.executable,
            "SN_VENV": str(venv), "SN_SETUP_LOG": str(log), "SN_SHARED_WHEELS": str(tmp_path / "no_wheels"),
            "FAKE_PIP_CALLS": str(calls), "MAX_JOBS": "1",
        }
        result = subprocess.run(["bash", str(SCRIPT)], env={**base, **env}, capture_output=True, text=True,
                                timeout=300)
        return result, [json.loads(line) for line in calls.read_text().splitlines()]

    run.venv, run.site, run.log = venv, site, log
    return run


def _installed(calls, what):
    return [c for c in calls if "install" in c and any(what in a for a in c)]


def test_the_core_profile_sets_up_then_returns_at_once(setup):
    result, calls = setup(SN_PROFILE="core")
    assert result.returncode == 0, result.stdout + result.stderr
    for step in ("step 1/5: virtual environment", "step 2/5: torch", "step 3/5: build tools",
                 "step 4/5: sn_plugin (editable, extras: test)", "step 5/5: import check"):
        assert step in result.stdout
    (project,) = _installed(calls, ".[test]")
    assert "--no-build-isolation" in project and "-e" in project and "-v" in project
    assert not _installed(calls, "mmcv")
    assert (setup.venv / ".sn_setup_stamp_core").is_file() and not (setup.venv / ".sn_setup_stamp").exists()

    again, calls_after = setup(SN_PROFILE="core")
    assert again.returncode == 0 and "up to date" in again.stdout
    assert calls_after == calls


def test_a_failing_mmcv_build_names_the_step_the_log_and_the_fix(setup):
    compiler_error = "error: command 'c++' failed: No such file or directory"
    result, calls = setup(FAKE_PIP_FAIL="mmcv", FAKE_PIP_OUTPUT=compiler_error)
    assert result.returncode == 1
    # Before the long build: what it is and how to skip it.
    assert "compiled from source" in result.stdout and "make test-core" in result.stdout
    assert "FAILED at step 4/7 (mmcv 2.1.0)" in result.stderr
    assert "likely fix: install a C++ compiler" in result.stderr
    assert str(setup.log) in result.stderr and compiler_error in result.stderr
    assert compiler_error in setup.log.read_text()
    assert not _installed(calls, ".[all]")  # nothing after the failed step ran
    assert not list(setup.venv.glob(".sn_setup_stamp*"))


def test_a_network_failure_stops_at_torch(setup):
    result, calls = setup(FAKE_PIP_FAIL="torch==", FAKE_PIP_OUTPUT=(
        "WARNING: Retrying after connection broken by 'NewConnectionError(... Temporary failure in name "
        "resolution)'\nERROR: No matching distribution found for torch==2.13.0"))
    assert result.returncode == 1
    assert "FAILED at step 2/7 (torch 2.13.0 + torchvision 0.28.0)" in result.stderr
    assert "could not reach the package index" in result.stderr
    assert len(calls) == 2  # pip --version, then the torch install
    assert not list(setup.venv.glob(".sn_setup_stamp*"))


def test_no_compiler_stops_before_the_mmcv_build(setup):
    result, calls = setup(CXX="/nonexistent/c++")
    assert result.returncode == 1
    assert "FAILED at step 4/7" in result.stderr and "no C++ compiler" in result.stderr
    assert "apt-get install build-essential" in result.stderr
    assert not _installed(calls, "mmcv")


def test_mmcv_without_its_compiled_ops_is_not_left_installed(setup):
    result, calls = setup(FAKE_MMCV_WITHOUT_OPS="1")
    assert result.returncode == 1 and "without its compiled ops" in result.stderr
    assert ["uninstall", "-y", "mmcv"] in calls
    assert not (setup.site / "mmcv").exists()


def test_a_failed_rerun_is_never_taken_for_a_finished_install(setup):
    assert setup(SN_PROFILE="core")[0].returncode == 0
    failed, calls = setup(SN_FORCE="1", FAKE_PIP_FAIL="mmcv")
    assert failed.returncode == 1
    assert not list(setup.venv.glob(".sn_setup_stamp*")), "a failed run must leave no stamp behind"
    rerun, calls_after = setup(SN_PROFILE="core")
    assert rerun.returncode == 0 and "up to date" not in rerun.stdout
    assert len(calls_after) > len(calls)


def test_the_full_profile_installs_every_step_in_order(setup):
    result, calls = setup()
    assert result.returncode == 0, result.stdout + result.stderr
    installs = [" ".join(c) for c in calls if "install" in c]
    order = [next(i for i, c in enumerate(installs) if what in c) for what in ("torch==", "ninja", "mmcv", ".[all]")]
    assert order == sorted(order)
    assert "step 6/7: detectron2" in result.stdout and "step 7/7: import check" in result.stdout
    assert (setup.venv / ".sn_setup_stamp").is_file()
    # the full environment also satisfies the core profile
    core, calls_after = setup(SN_PROFILE="core")
    assert "up to date" in core.stdout and calls_after == calls


def test_the_import_check_looks_at_what_is_installed_not_at_the_checkout(setup):
    """The script runs in the checkout, where `sn_plugin` would import from the working directory."""
    result, _ = setup(SN_PROFILE="core", FAKE_PIP_FORGETS_PROJECT="1")
    assert result.returncode == 1
    assert "FAILED at step 5/5 (import check)" in result.stderr and "sn_plugin is not installed" in result.stderr
    assert not list(setup.venv.glob(".sn_setup_stamp*"))


def test_an_unknown_profile_is_refused(setup):
    result, _ = setup(SN_PROFILE="minimal")
    assert result.returncode == 2 and "SN_PROFILE must be 'full' or 'core'" in result.stderr


# -- the console view of a build ---------------------------------------------------------------------
def _view(text, build=True, clock=None):
    lines = []
    ticks = iter(range(0, 10_000, 30))  # each clock reading is 30 s later
    progress = setup_progress.Progress("mmcv", build, lines.append, clock or (lambda: float(next(ticks))), every=0)
    for line in textwrap.dedent(text).strip().splitlines():
        progress.line(line)
    progress.finish()
    return lines


def test_a_ninja_build_shows_files_done_of_the_total_and_time_left():
    lines = _view("""
        Collecting mmcv==2.1.0
          Building wheel for mmcv (setup.py): started
          [1/4] c++ -MMD -MF /tmp/b/nms.o.d -I/x -c /tmp/pip/mmcv/ops/csrc/pytorch/nms.cpp -o /tmp/b/nms.o
          In file included from /usr/include/x.h:1: warning: unused
          [2/4] /usr/bin/x86_64-linux-gnu-g++-12 -c /tmp/pip/roi_align.cpp -o /tmp/b/roi_align.o
          [4/4] c++ -c /tmp/pip/focal_loss.cpp -o /tmp/b/focal_loss.o
          Requirement already satisfied: numpy in /venv/lib/python3.11/site-packages
        Successfully installed mmcv-2.1.0
    """)
    assert lines[0] == "Collecting mmcv==2.1.0"
    assert lines[2].startswith("[mmcv] compiled 1/4 files (nms.cpp),") and lines[2].endswith("left")
    assert lines[3].startswith("[mmcv] compiled 2/4 files (roi_align.cpp)")
    # 2 files in the 60 s since the build started: 2 more take about 60 s
    assert lines[3].endswith("about 1m00s left")
    assert lines[4].startswith("[mmcv] compiled 4/4 files") and "left" not in lines[4]
    assert "Successfully installed mmcv-2.1.0" in lines
    assert not any("warning" in line or "-MMD" in line or "already satisfied" in line for line in lines)
    assert lines[-1].startswith("[mmcv] compiler finished after")


def test_a_build_without_ninja_counts_compiler_commands():
    lines = _view("""
        gcc -pthread -fPIC -I/x -c mmcv/ops/csrc/pytorch/nms.cpp -o build/nms.o
        gcc -pthread -fPIC -I/x -c mmcv/ops/csrc/pytorch/info.cpp -o build/info.o
        g++ -shared build/nms.o build/info.o -o build/_ext.so
    """)
    assert lines[0].startswith("[mmcv] compiled 1 files (nms.cpp)")
    assert lines[1].startswith("[mmcv] compiled 2 files (info.cpp)")
    assert len(lines) == 3  # the link line is not a compile


def test_plain_pip_output_passes_through_without_index_noise():
    lines = _view("""
        WARNING: Location 'file:///opt/pypi/simple/torch/' is ignored: it is neither a file nor a directory.
        Collecting torch==2.13.0
        [notice] A new release of pip is available
          Downloading torch-2.13.0.whl (900 MB)
    """, build=False)
    assert lines == ["Collecting torch==2.13.0", "  Downloading torch-2.13.0.whl (900 MB)"]


def test_a_silent_step_gets_a_heartbeat():
    producer = subprocess.Popen([sys.executable, "-c", "import time; print('Collecting torch', flush=True); "
                                 "time.sleep(1.5); print('done', flush=True)"], stdout=subprocess.PIPE, text=True)
    lines = []
    progress = setup_progress.Progress("torch", False, lines.append, lambda: 0.0)
    setup_progress.run(producer.stdout, progress, heartbeat=0.2)
    producer.wait()
    assert lines[0] == "Collecting torch" and lines[-1] == "done"
    assert any(line.startswith("[torch] still working") for line in lines[1:-1])
