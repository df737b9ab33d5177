"""The adversarial suite's case table: every case is an attack and the outcome it must have.

A case runs one malformed, hostile or unlucky input against the public API (or the CLI) in a fresh
temporary directory and says what must happen:

* ``Refused(ErrorType, "fragment", ...)``: an exception of ``ErrorType`` whose message contains every
  fragment (case-insensitive): the file, key or argument at fault, what was expected and what came.
* ``Handled(check)``: the call succeeds (or a job finishes, skipping and reporting the one bad input)
  and ``check(result, tmp)`` confirms the result is right; it raises ``AssertionError`` when it is not,
  or :class:`DataLost` when something that was written is gone.

:func:`outcome` runs a case and classifies what actually happened into one of :data:`OUTCOMES`; the
tests assert the good outcome, and ``python -m tests.adversarial.report`` counts outcomes per category
(the table in the hardening issue's note).
"""

from __future__ import annotations

import dataclasses
import traceback
from pathlib import Path
from typing import Any, Callable

CLEAR_ERROR = "clear error"
CORRECT = "correct"
UNCLEAR_ERROR = "unclear error"
SILENT_WRONG = "silent wrong"
ABORTED = "job aborted"
DATA_LOST = "data lost"
OUTCOMES = (CLEAR_ERROR, CORRECT, UNCLEAR_ERROR, SILENT_WRONG, ABORTED, DATA_LOST)
GOOD = (CLEAR_ERROR, CORRECT)


class DataLost(AssertionError):
    """Raised by a ``Handled`` check when data that was written (episodes, checkpoints) is gone."""


@dataclasses.dataclass(frozen=True)
class Refused:
    """The attack must raise ``error`` with every one of ``fragments`` in its message."""

    error: type[BaseException]
    fragments: tuple[str, ...]

    def __init__(self, error: type[BaseException], *fragments: str):
        object.__setattr__(self, "error", error)
        object.__setattr__(self, "fragments", fragments)


@dataclasses.dataclass(frozen=True)
class Handled:
    """The attack must succeed and ``check(result, tmp)`` must pass.

    ``job=True`` marks a whole job (an import, a training run): an exception there means one bad
    input ended the job, counted as :data:`ABORTED` rather than an unclear error.
    """

    check: Callable[[Any, Path], None]
    job: bool = False


@dataclasses.dataclass(frozen=True)
class Case:
    """One attack: ``run(tmp)`` does it in the fresh directory ``tmp``; ``expect`` says what must happen."""

    category: str
    name: str
    run: Callable[[Path], Any]
    expect: Refused | Handled

    @property
    def id(self) -> str:
        return f"{self.category}/{self.name}"


@dataclasses.dataclass(frozen=True)
class Result:
    """What a case did: its outcome and, for a bad one, why."""

    outcome: str
    detail: str = ""


def _message(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def outcome(case: Case, tmp: Path) -> Result:
    """Run ``case`` in ``tmp`` and classify what happened (never raises for the case's own failures)."""
    expect = case.expect
    try:
        value = case.run(tmp)
    except Exception as error:  # the classification is the point: every exception is an outcome
        if isinstance(expect, Refused):
            text = str(error).lower()
            missing = [f for f in expect.fragments if f.lower() not in text]
            if isinstance(error, expect.error) and not missing:
                return Result(CLEAR_ERROR)
            why = f"expected {expect.error.__name__} naming {list(expect.fragments)}"
            if missing:
                why += f" (missing {missing})"
            return Result(UNCLEAR_ERROR, f"{why}; got {_message(error)}\n{traceback.format_exc(limit=-3)}")
        kind = ABORTED if expect.job else UNCLEAR_ERROR
        return Result(kind, f"expected success; got {_message(error)}\n{traceback.format_exc(limit=-3)}")
    if isinstance(expect, Refused):
        return Result(SILENT_WRONG, f"expected {expect.error.__name__} naming {list(expect.fragments)}; "
                                    f"the call returned {value!r:.200}")
    try:
        expect.check(value, tmp)
    except DataLost as error:
        return Result(DATA_LOST, str(error))
    except AssertionError as error:
        return Result(SILENT_WRONG, f"the result is wrong: {error}")
    return Result(CORRECT)


def case_ids(cases: list[Case]) -> list[str]:
    """pytest ids for ``cases``; refuses duplicates so every row of the table is one attack."""
    ids = [case.id for case in cases]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise ValueError(f"duplicate adversarial case ids: {duplicated}")
    return ids
