"""The credit stage lives in ospo_fast.token_credit, is served from its old modules, and imports only lower layers.

The maps themselves are tested where they were specified: tests/test_segment.py (span -> token maps),
tests/test_advantages.py (spread_credit) and tests/test_trainer.py (completion_offsets).
"""

import ast
import importlib
import inspect

import pytest

import ospo_fast
from ospo_fast import token_credit

MOVED = {
    "ospo_fast.segment": ("token_player_map", "token_player_maps"),
    "ospo_fast.policy": ("completion_offsets",),
    "ospo_fast.advantages": ("spread_credit",),
    "ospo_fast": ("spread_credit", "token_player_map", "token_player_maps"),
}


@pytest.mark.parametrize("module", sorted(MOVED))
def test_moved_names_are_the_credit_stage_functions(module):
    for name in MOVED[module]:
        assert getattr(importlib.import_module(module), name) is getattr(token_credit, name)


def test_from_segment_import_star_still_gives_the_token_maps():
    namespace: dict = {}
    exec("from ospo_fast.segment import *", namespace)
    assert namespace["token_player_maps"] is token_credit.token_player_maps


def package_imports(module) -> set[str]:
    """The ``ospo_fast`` modules that ``module`` imports at its top level (not inside functions)."""
    tree = ast.parse(inspect.getsource(module))
    package = module.__name__.rsplit(".", 1)[0] if module.__name__.count(".") > 1 else "ospo_fast"
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package if node.level == 1 else package.rsplit(".", node.level - 1)[0]
            if node.module:
                found.add(f"{base}.{node.module}")
            else:
                found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_the_credit_stage_imports_only_lower_layers():
    assert package_imports(token_credit) <= {"ospo_fast._checks", "ospo_fast._device", "ospo_fast.segment"}


def test_attribution_does_not_import_advantages():
    from ospo_fast import attribution

    assert "ospo_fast.advantages" not in package_imports(attribution)
    assert "ospo_fast.token_credit" in package_imports(attribution)


def test_lower_modules_do_not_import_the_credit_stage_at_import():
    from ospo_fast import segment

    assert "ospo_fast.token_credit" not in package_imports(segment)
    assert ospo_fast.segment is segment
