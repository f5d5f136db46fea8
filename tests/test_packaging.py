"""Packaging: configs travel with the package, `sn_plugin::` bases, the project's metadata.

The full round trip (build a wheel, install it into a fresh environment, use the configs
from outside the checkout) is what docs/setup.md describes; here each piece is checked
fast: where config_files looks, what setup.py's build step and the sdist carry, how
mmengine resolves `sn_plugin::` bases, and that pyproject.toml says what was tested.
"""
import importlib.util
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from sn_plugin.integrations import config_files

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
FASTER = "mmdet/faster-rcnn_r50_fpn_sn-all_1x_coco.py"


# -- where the configs are ----------------------------------------------------------------------------
def _files(folder: Path):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)


def test_the_configs_found_are_this_source_trees():
    """A checkout (editable install) uses its configs folder; an installed wheel, its copy of it."""
    import sn_plugin
    package = Path(sn_plugin.__file__).resolve().parent
    if package == REPO / "sn_plugin":
        assert config_files.config_root() == REPO / "configs"
    else:  # these tests run from an unpacked sdist against the installed package
        assert config_files.config_root() == package / ".mim" / "configs"
        assert _files(config_files.config_root()) == _files(REPO / "configs")
    assert Path(config_files.config_file(FASTER)).read_text() == (REPO / "configs" / FASTER).read_text()
    assert FASTER in config_files.list_configs("mmdet")
    assert "detectron2/Base-SN-RCNN-FPN.yaml" in config_files.list_configs()
    assert not any(name.endswith(("metafile.yml", ".md")) for name in config_files.list_configs())


def _config_files_in(package_dir: Path):
    """config_files as it runs from an installed package at ``package_dir``."""
    target = package_dir / "integrations" / "config_files.py"
    target.parent.mkdir(parents=True)
    shutil.copy(config_files.__file__, target)
    spec = importlib.util.spec_from_file_location("installed_config_files", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_installed_package_uses_its_mim_folder(tmp_path):
    site = tmp_path / "site-packages"
    (site / "sn_plugin" / ".mim" / "configs" / "mmdet").mkdir(parents=True)
    (site / "sn_plugin" / ".mim" / "configs" / FASTER).write_text("_base_ = []\n")
    (site / "configs").mkdir()  # another distribution's top-level folder is not ours
    module = _config_files_in(site / "sn_plugin")
    assert module.config_file(FASTER) == str(site / "sn_plugin" / ".mim" / "configs" / FASTER)


def test_an_installed_package_without_configs_says_how_to_get_them(tmp_path):
    (tmp_path / "configs").mkdir()
    module = _config_files_in(tmp_path / "sn_plugin")
    with pytest.raises(FileNotFoundError, match="pip wheel --no-deps --no-build-isolation"):
        module.config_root()


def test_a_config_name_must_stay_inside_the_configs_folder():
    for name in ("/etc/passwd", "../setup.py", "mmdet/../../pyproject.toml", ""):
        with pytest.raises(ValueError, match="must be a path inside"):
            config_files.config_file(name)


def test_a_missing_config_names_the_closest_shipped_ones():
    with pytest.raises(FileNotFoundError, match=re.escape(FASTER)):
        config_files.config_file("mmdet/faster-rcnn_r50_fpn_sn-all_1x_coco.yaml")


# -- what the build carries ---------------------------------------------------------------------------
def _setup_py(*args, cwd=REPO):
    """setup.py run by this interpreter (its build helpers import torch, which is here)."""
    result = subprocess.run([sys.executable, "setup.py", "-q", *args], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_build_puts_the_configs_and_the_index_under_dot_mim(tmp_path):
    build_lib = tmp_path / "lib"
    stale = build_lib / "sn_plugin" / ".mim" / "configs" / "mmdet" / "deleted-since-last-build.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("")
    _setup_py("build_py", "--build-lib", str(build_lib))
    mim = build_lib / "sn_plugin" / ".mim"
    assert (mim / "model-index.yml").read_text() == (REPO / "model-index.yml").read_text()
    assert _files(mim / "configs") == _files(REPO / "configs")
    assert (mim / "configs" / FASTER).read_text() == (REPO / "configs" / FASTER).read_text()


def test_the_sdist_carries_what_the_wheel_is_built_from(tmp_path):
    _setup_py("sdist", "--dist-dir", str(tmp_path))
    (archive,) = tmp_path.glob("sn_plugin-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for required in ("setup.py", "pyproject.toml", "MANIFEST.in", "model-index.yml", "README.md",
                     "configs/_base_/sn_runtime.py", "configs/" + FASTER, "configs/mmdet/metafile.yml",
                     "configs/detectron2/COCO-Detection/faster_rcnn_R_50_FPN_1x_sn.yaml",
                     "tests/test_packaging.py"):
        assert required in names, required
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "sn_plugin" / "kernels" / "csrc").glob("*")
               if p.suffix in (".cpp", ".h")} if (REPO / "sn_plugin" / "kernels" / "csrc").is_dir() else set()
    assert sources <= names, "the C++ extension's sources must be in the sdist: " + str(sources - names)
    assert not any("__pycache__" in name for name in names)


# -- metadata -----------------------------------------------------------------------------------------
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _pins():
    pins = {}
    for line in (REPO / "requirements" / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def test_the_requirements_admit_the_tested_versions():
    """Every bound in pyproject.toml admits the version requirements/constraints.txt pins (the tested set)."""
    from packaging.requirements import Requirement
    pins = _pins()
    extras = PYPROJECT["project"]["optional-dependencies"]
    requirements = [Requirement(r) for group in extras.values() for r in group if not r.startswith("sn_plugin[")]
    checked = 0
    for requirement in requirements:
        pinned = pins.get(re.sub(r"[-_.]+", "-", requirement.name).lower())
        if pinned is not None:
            assert requirement.specifier.contains(pinned, prereleases=True), (str(requirement), pinned)
            checked += 1
    assert checked >= 10
    (torch,) = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] if r.startswith("torch")]
    default = re.search(r'TORCH_VERSION="\$\{TORCH_VERSION:-([0-9.]+)\}"', (REPO / "scripts" / "setup_env.sh").read_text())
    assert torch.specifier.contains(default.group(1)), "setup_env.sh's default torch must satisfy pyproject.toml"


def test_the_version_has_one_source():
    import sn_plugin
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "sn_plugin.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", sn_plugin.__version__)


def test_no_license_is_claimed_without_a_license_file():
    licensed = any((REPO / name).exists() for name in ("LICENSE", "LICENSE.txt", "LICENSE.md", "COPYING"))
    claims = "license" in PYPROJECT["project"] or any(c.startswith("License ::") for c in PYPROJECT["project"]["classifiers"])
    assert licensed == claims


def test_the_running_python_is_one_the_metadata_admits():
    from packaging.specifiers import SpecifierSet
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains("%d.%d" % sys.version_info[:2])
    assert f"Programming Language :: Python :: {sys.version_info[0]}.{sys.version_info[1]}" in \
        PYPROJECT["project"]["classifiers"]


# -- `_base_ = 'sn_plugin::...'` ----------------------------------------------------------------------
@pytest.fixture
def config_scope():
    pytest.importorskip("mmdet")
    from sn_plugin.integrations import config_scope
    was_installed = config_scope.installed()
    config_scope.uninstall()
    yield config_scope
    config_scope.uninstall()
    if was_installed:
        config_scope.install()


def _user_config(tmp_path, base, extra="", name="my_config.py"):
    path = tmp_path / name
    path.write_text(f"_base_ = {base!r}\n{extra}")
    return str(path)


def test_a_sn_plugin_base_loads_like_the_file_itself(config_scope, tmp_path):
    from mmengine.config import Config
    user = _user_config(tmp_path, "sn_plugin::" + FASTER, "train_dataloader = dict(batch_size=4)\n")
    with pytest.raises(AssertionError, match="sn_plugin"):  # mmengine alone does not know the package
        Config.fromfile(user)
    config_scope.install()
    config_scope.install()  # idempotent
    inherited = Config.fromfile(user).to_dict()
    direct = Config.fromfile(config_files.config_file(FASTER)).to_dict()
    assert inherited.pop("train_dataloader")["batch_size"] == 4
    direct.pop("train_dataloader")
    assert inherited == direct
    assert inherited["model"]["_scope_"] == "mmdet"  # the toolkit's own scope, not a 'sn_plugin' one
    # Other packages' bases still go through mmengine.
    Config.fromfile(_user_config(tmp_path, "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py", name="plain.py"))
    config_scope.uninstall()
    with pytest.raises(AssertionError, match="sn_plugin"):
        Config.fromfile(user)


def test_a_missing_sn_plugin_base_is_named(config_scope, tmp_path):
    from mmengine.config import Config
    config_scope.install()
    with pytest.raises(FileNotFoundError, match="did you mean"):
        Config.fromfile(_user_config(tmp_path, "sn_plugin::mmdet/faster-rcnn_r50_fpn_sn-all_1x_cocoo.py"))


def test_uninstall_refuses_to_drop_a_later_patch(config_scope):
    from mmengine.config import Config
    config_scope.install()
    ours = Config.__dict__["_get_cfg_path"]
    Config._get_cfg_path = staticmethod(lambda cfg_path, filename: ours.__func__(cfg_path, filename))
    try:
        with pytest.raises(RuntimeError, match="replaced after sn_plugin"):
            config_scope.uninstall()
    finally:
        Config._get_cfg_path = ours


def test_a_toolkit_script_runs_with_sn_plugin_bases(tmp_path):
    pytest.importorskip("mmdet")
    script = tmp_path / "train.py"
    script.write_text("import sys\nfrom mmengine.config import Config\n"
                      "print('norm', Config.fromfile(sys.argv[1]).model.backbone.norm_cfg.type)\n")
    user = _user_config(tmp_path, "sn_plugin::" + FASTER)
    result = subprocess.run([sys.executable, "-m", "sn_plugin.integrations.config_scope", str(script), user],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "norm SN" in result.stdout


def test_the_script_runner_names_a_missing_script():
    pytest.importorskip("mmdet")
    from sn_plugin.integrations.config_scope import main
    with pytest.raises(SystemExit, match="no such file: no_such_script.py"):
        main(["no_such_script.py"])
