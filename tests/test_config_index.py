"""The model index (model-index.yml, configs/*/metafile.yml) and the per-toolkit READMEs
describe the configs that exist, with the numbers and settings the configs themselves say."""
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
OPENMMLAB = ("mmdet", "mmseg", "mmaction2", "mmpretrain")


def _index():
    return yaml.safe_load((REPO / "model-index.yml").read_text())


def _models():
    """(toolkit, model entry) for every model the index lists."""
    for metafile in _index()["Import"]:
        for model in yaml.safe_load((REPO / metafile).read_text())["Models"]:
            yield Path(metafile).parent.name, model


def _leaf_configs():
    """Every config a user trains: the bases (configs/_base_, Base-*.yaml) and the demo are not models.
    A toolkit's folder may hold a family's configs in a subfolder (mmdet/xbn/)."""
    leaves = [p for toolkit in OPENMMLAB for p in (CONFIGS / toolkit).rglob("*.py")]
    leaves += [p for p in (CONFIGS / "detectron2").rglob("*.yaml") if not p.name.startswith("Base-")]
    return sorted(p.relative_to(REPO).as_posix() for p in leaves)


def test_the_index_imports_one_metafile_per_config_family():
    families = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and p.name not in ("_base_", "demo"))
    assert sorted(Path(m).parent.name for m in _index()["Import"]) == families


def test_the_index_lists_every_config_once_and_only_configs_that_exist():
    listed = [model["Config"] for _, model in _models()]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == _leaf_configs()
    names = [model["Name"] for _, model in _models()]
    assert len(names) == len(set(names))
    assert all(Path(model["Config"]).stem == model["Name"] for _, model in _models())


def test_modelindex_parses_the_index():
    """The model-index package mim uses reads it without complaint. Its README check resolves
    paths from the metafile's folder, whereas OpenMMLab's metafiles (mmdet's too) give them
    from the repository root: those are checked below instead."""
    load = pytest.importorskip("modelindex.load_model_index").load
    index = load(str(REPO / "model-index.yml"))
    index.build_models_with_collections()
    errors = [(entry["filepath"], error) for entry in index.collect_check_errors()
              for error in entry["errors"] if not error.startswith("Path to README file")]
    assert errors == []
    assert len(index.models) == len(_leaf_configs())


def test_every_collection_has_a_readme_naming_each_of_its_configs():
    """One metafile per toolkit; a collection per paper (SN, and the family's XBNBlock and CN)."""
    for metafile in _index()["Import"]:
        meta = yaml.safe_load((REPO / metafile).read_text())
        collections = {collection["Name"]: collection for collection in meta["Collections"]}
        assert len(collections) == len(meta["Collections"])
        for collection in collections.values():
            readme = REPO / collection["README"]
            assert readme.parent == (REPO / metafile).parent
            assert "@inproceedings{luo2019switchable" in readme.read_text()
        for model in meta["Models"]:
            readme = REPO / collections[model["In Collection"]]["README"]
            assert Path(model["Config"]).relative_to(readme.parent.relative_to(REPO)).as_posix() in readme.read_text()


def _header(config: Path) -> str:
    """The comment block a config starts with."""
    lines = config.read_text().splitlines()
    return "\n".join(line for line in lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))])


MODELS = list(_models())
MODEL_IDS = [model["Name"] for _, model in MODELS]


@pytest.mark.parametrize("toolkit, model", MODELS, ids=MODEL_IDS)
def test_each_result_is_the_one_the_config_header_quotes(toolkit, model):
    header = _header(REPO / model["Config"])
    for result in model.get("Results", []):
        for value in result["Metrics"].values():
            assert re.search(rf"(?<![\d.]){re.escape(str(value))}(?!\d)", header), (model["Name"], value)
    # The numbers are the paper's; the index says where each comes from.
    assert ("Results" in model) == ("Results Source" in model)


def _openmmlab_settings(config: Path):
    from mmengine.config import Config
    cfg = Config.fromfile(str(config))
    backbone = cfg.model.get("model", cfg.model).backbone  # a ConsistentNormModel holds the model
    init_cfg = backbone.get("init_cfg") or {}
    pretrained = init_cfg.get("checkpoint") or backbone.get("pretrained") or "none"
    schedule = ({"Epochs": cfg.train_cfg.max_epochs} if "max_epochs" in cfg.train_cfg
                else {"Iterations": cfg.train_cfg.max_iters})
    # OpenMMLab names the GPUs in the file name (`_8xb2-`); mmdet's detection configs leave out its default, 8.
    gpus = re.search(r"_(\d+)xb\d+", config.name)
    return pretrained, schedule, (int(gpus.group(1)) if gpus else 8) * cfg.train_dataloader.batch_size


def _detectron2_settings(config: Path):
    from sn_plugin.integrations.detectron2 import get_sn_cfg
    cfg = get_sn_cfg()
    cfg.merge_from_file(str(config))
    return cfg.MODEL.WEIGHTS or "none", {"Iterations": cfg.SOLVER.MAX_ITER}, cfg.SOLVER.IMS_PER_BATCH


@pytest.mark.parametrize("toolkit, model", MODELS, ids=MODEL_IDS)
def test_each_setting_in_the_index_is_the_configs_own(toolkit, model):
    """Weights, schedule and total batch size as the toolkit reads them from the config."""
    if toolkit == "detectron2":
        pytest.importorskip("detectron2")
        settings = _detectron2_settings(REPO / model["Config"])
    else:
        pytest.importorskip({"mmaction2": "mmaction"}.get(toolkit, toolkit))
        settings = _openmmlab_settings(REPO / model["Config"])
    pretrained, schedule, batch_size = settings
    meta = model["Metadata"]
    assert meta["Pretrained"] == pretrained
    assert {key: meta[key] for key in ("Epochs", "Iterations") if key in meta} == schedule
    assert meta["Batch Size"] == batch_size
