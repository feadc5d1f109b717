"""Accuracy of Spanish regional variant detection on the labelled set.

    python scripts/spanish_regions_eval.py [tests/spanish/regions_labelled.tsv] [--errors]

Each line of the set is `region<TAB>sentence`, region one of worker.spanish.regions.REGIONS or `none`
(no regional marker: it must get the neutral default). Prints the accuracy overall and per region, and
how many no-marker sentences were wrongly given a region (this must be 0).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from worker.spanish.regions import NEUTRAL, REGIONS, detect

DEFAULT_SET = Path(__file__).resolve().parent.parent / "tests" / "spanish" / "regions_labelled.tsv"


def load(path: Path) -> list[tuple[str, str]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        label, sep, sentence = line.partition("\t")
        if not sep or label not in (*REGIONS, "none"):
            raise SystemExit(f"{path}:{n}: expected 'region<TAB>sentence' with a known region, got {line!r}")
        rows.append((NEUTRAL if label == "none" else label, sentence))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT_SET)
    parser.add_argument("--errors", action="store_true", help="list each wrongly detected sentence")
    args = parser.parse_args()

    rows = load(args.path)
    total, right = Counter(), Counter()
    errors = []
    for label, sentence in rows:
        got = detect(sentence)
        total[label] += 1
        if got.region == label:
            right[label] += 1
        else:
            errors.append((label, got.region, got.markers, sentence))
    n, ok = sum(total.values()), sum(right.values())
    print(f"accuracy {ok}/{n} = {100 * ok / n:.1f}%")
    for label in (*REGIONS, NEUTRAL):
        print(f"  {label:<12} {right[label]:>3}/{total[label]:<3}")
    given = total[NEUTRAL] - right[NEUTRAL]
    print(f"no-marker sentences given a region: {given} of {total[NEUTRAL]}")
    if args.errors:
        for label, region, markers, sentence in errors:
            print(f"  expected {label}, got {region} (markers {markers}): {sentence}")


if __name__ == "__main__":
    main()
