"""Count the adversarial suite's outcomes per category: ``python -m tests.adversarial.report [--json PATH]``.

Prints a markdown table (cases per category and per outcome) and lists every case whose outcome is
not a good one, with why.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

from tests.adversarial.harness import GOOD, OUTCOMES, outcome
from tests.adversarial.registry import all_cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the per-case outcomes here")
    args = parser.parse_args()
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    rows = []
    for case in all_cases():
        with tempfile.TemporaryDirectory() as tmp:
            result = outcome(case, Path(tmp))
        counts[case.category][result.outcome] += 1
        rows.append({"case": case.id, "outcome": result.outcome, "detail": result.detail})
    print("| category | cases | " + " | ".join(OUTCOMES) + " |")
    print("|---|---:|" + "---:|" * len(OUTCOMES))
    total = collections.Counter()
    for category in sorted(counts):
        total.update(counts[category])
        cells = " | ".join(str(counts[category][o]) for o in OUTCOMES)
        print(f"| {category} | {sum(counts[category].values())} | {cells} |")
    print(f"| **all** | {sum(total.values())} | " + " | ".join(str(total[o]) for o in OUTCOMES) + " |")
    for row in rows:
        if row["outcome"] not in GOOD:
            print(f"\n{row['case']}: {row['outcome']}\n  {row['detail'].splitlines()[0] if row['detail'] else ''}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
