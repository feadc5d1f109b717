"""Regional variant detection (worker/spanish/regions.py) on single cases and on the labelled set."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.spanish_regions_eval import load
from worker.spanish.regions import NEUTRAL, REGIONS, detect

LABELLED = Path(__file__).parent / "regions_labelled.tsv"


def test_issue_example_rioplatense_with_markers_in_text_order() -> None:
    d = detect("Che boludo, ¿andás bien o qué?")
    assert d.region == "rioplatense"
    assert d.markers == ["che", "boludo", "andás"]


@pytest.mark.parametrize(
    ("text", "region"),
    [
        ("Órale wey, qué chido.", "mexican"),
        ("orale guey, que chido", "mexican"),  # slang matches without its accents
        ("Parce, qué bacano.", "colombian"),
        ("¿Cachai? Sí po, weón.", "chilean"),
        ("¿Querís venir? Tenís que avisar.", "chilean"),  # Chilean voseo, not the River Plate one
        ("Asere, ¿qué bolá?", "caribbean"),
        ("Oye causita, vamos a la jato.", "andean"),
        ("Vos tenés razón, parce.", "colombian"),  # Paisa voseo: voseo counts for both, parce decides
    ],
)
def test_each_region(text: str, region: str) -> None:
    assert detect(text).region == region


def test_voseo_is_matched_with_its_accent() -> None:
    # "fíjate"/"tenes" are tuteo or a typo; "fijate"/"tenés" are voseo.
    assert detect("Fíjate bien, tienes que venir.").markers == []
    assert detect("tenes que venir").markers == []
    assert detect("Fijate bien, tenés que venir.").region == "rioplatense"


def test_whole_words_only() -> None:
    d = detect("El chequeo de la pobre población poco a poco mejoró; wepaje y cheque.")
    assert (d.region, d.markers) == (NEUTRAL, [])


def test_shared_words_alone_do_not_decide() -> None:
    assert detect("¡Qué chévere!").region == NEUTRAL  # Caribbean, Colombian and Andean alike
    assert detect("La mina de oro cerró.").region == NEUTRAL  # an ordinary word too
    d = detect("Pucha, se cayó la palta.")  # Chilean and Andean tie
    assert (d.region, d.markers) == (NEUTRAL, ["pucha", "palta"])
    assert d.scores["chilean"] == d.scores["andean"]


def test_labelled_set_accuracy_and_no_marker_sentences_stay_neutral() -> None:
    rows = load(LABELLED)
    counts = {label: sum(1 for lbl, _ in rows if lbl == label) for label in (*REGIONS, NEUTRAL)}
    assert len(rows) >= 120 and all(counts[r] >= 15 for r in REGIONS) and counts[NEUTRAL] >= 15
    results = [(label, detect(sentence)) for label, sentence in rows]
    for label, d in results:
        if label == NEUTRAL:  # a sentence without markers is never given a region
            assert d.region == NEUTRAL, d
        if d.region != NEUTRAL:
            assert d.markers  # and a region always comes with the markers that chose it
    right = sum(1 for label, d in results if d.region == label)
    assert right / len(rows) >= 0.9
