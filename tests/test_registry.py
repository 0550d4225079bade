"""The registry of compressors: names, default configs, help texts."""

from __future__ import annotations

import dataclasses
import re

import pytest

from compressor.config import configs
from compressor.contract import Compressor
from compressor.errors import CompressorError
from compressor.methods import registry
from compressor.plan import recipe
from compressor.stats.accumulators import TENSOR_STATISTICS, Request

ITEMS = sorted(registry.COMPRESSORS.items())


def test_registry_is_not_empty_and_has_lord():
    assert "lord" in registry.COMPRESSORS


def test_names_are_lower_case_and_unique():
    names = [cls.name for cls in registry.COMPRESSORS.values()]
    assert len(names) == len(set(names))
    for key, cls in registry.COMPRESSORS.items():
        assert key == cls.name
        assert re.fullmatch(r"[a-z][a-z0-9_]*", key), key


@pytest.mark.parametrize("name, cls", ITEMS)
def test_compressor_declares_itself(name, cls):
    assert issubclass(cls, Compressor)
    assert cls.summary.strip() and cls.paper.strip()
    assert dataclasses.is_dataclass(cls.Config)


@pytest.mark.parametrize("name, cls", ITEMS)
def test_config_default_constructs(name, cls):
    config = cls.Config()
    compressor = registry.create(name, {})
    assert compressor.config == config
    requests = compressor.requests()
    assert isinstance(requests, tuple)
    assert all(isinstance(r, Request) and r.statistic in TENSOR_STATISTICS for r in requests)
    assert isinstance(compressor.uses_data, bool) and (compressor.uses_data or not requests)
    assert configs.to_dict(config)  # plain data, as compression.json records it


@pytest.mark.parametrize("cls", [cls.Config for _, cls in ITEMS]
                         + [recipe.CalibrationConfig, recipe.StepSpec, recipe.Recipe])
def test_every_field_has_help(cls):
    rows = configs.describe(cls)
    assert rows
    for field_name, type_name, _default, help_text in rows:
        assert help_text.strip(), f"{cls.__name__}.{field_name} has no help"
        assert type_name


def test_unknown_method_suggests_a_close_name():
    with pytest.raises(CompressorError, match="did you mean 'lord'"):
        registry.get("lor")
    with pytest.raises(CompressorError, match="valid: .*lord"):
        registry.get("zzz")
