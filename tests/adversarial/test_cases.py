"""Runs every adversarial case and asserts its good outcome (a clear error, or a correct result)."""

import pytest

from tests.adversarial.harness import GOOD, case_ids, outcome
from tests.adversarial.registry import all_cases

CASES = all_cases()


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_case(case, tmp_path):
    result = outcome(case, tmp_path)
    assert result.outcome in GOOD, f"{case.id}: {result.outcome}: {result.detail}"
