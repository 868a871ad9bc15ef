"""What ``import ospo_fast`` does: which modules it loads, and that the compiled operators exist right after."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ospo_fast import _extension


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def test_import_leaves_the_application_layer_and_its_heavy_dependencies_unloaded():
    loaded = _run("import sys, ospo_fast; print(' '.join(m for m in ('pandas', 'matplotlib', 'scipy', "
                  "'ospo_fast.app', 'ospo_fast.integrations') if m in sys.modules))")
    assert loaded == ""


def test_subpackages_load_on_first_use():
    assert _run("import ospo_fast as of; print(of.data.default_task.__name__, of.rewards.BM25Reward.__name__)") \
        == "default_task BM25Reward"
    with pytest.raises(subprocess.CalledProcessError):
        _run("import ospo_fast as of; of.no_such_subpackage")


@pytest.mark.skipif(not _extension.has_cpp(), reason="the C++ extension is not built")
def test_operators_exist_as_soon_as_the_package_is_imported():
    assert _run("import torch, ospo_fast; print(hasattr(torch.ops.ospo_fast, 'owen_aggregate'))") == "True"
