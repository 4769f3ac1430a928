"""Every shipped config parses: training YAMLs into TrainConfig, model presets into MMGPTConfig."""

from pathlib import Path

import pytest
import yaml

from mmgpt.config import MMGPTConfig, list_presets
from train.config import load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "configs/train").glob("*.yaml")), ids=lambda p: p.name)
def test_training_configs_parse(path):
    cfg = load_config(path)
    assert cfg.max_steps > 0


@pytest.mark.parametrize("name", list_presets())
def test_model_presets_parse(name):
    cfg = MMGPTConfig.from_preset(name)
    assert cfg.vision["backend"] == "vit"


@pytest.mark.parametrize("path", sorted((ROOT / "configs/accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_are_yaml_with_a_distributed_type(path):
    assert yaml.safe_load(path.read_text())["distributed_type"] in {"MULTI_GPU", "FSDP", "DEEPSPEED"}
