"""Every case of the adversarial suite: the ``CASES`` lists of the ``cases_*`` modules in this folder."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from tests.adversarial.harness import Case, case_ids


def all_cases() -> list[Case]:
    """The cases of every ``tests/adversarial/cases_*.py`` module, in module then table order."""
    cases: list[Case] = []
    for module in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
        if module.name.startswith("cases_"):
            cases += importlib.import_module(f"tests.adversarial.{module.name}").CASES
    case_ids(cases)
    return cases
