"""Shared by the CLI tests: a config whose every path lies in the test's temp folder."""
from __future__ import annotations

import pytest
import yaml

from tests.cli.helpers import config_data


@pytest.fixture
def cfg_path(tmp_path):
    path = tmp_path / "deployment_config.yaml"
    path.write_text(yaml.safe_dump(config_data(tmp_path)))
    return str(path)
