"""Which regional variety of Spanish a text is written in, from the markers it carries.

Two kinds of marker:

- voseo verb forms (`tenés`, `andás`, `sabís`, `mirá`): matched as written, accents included, because
  the accent is what tells them from the tuteo forms (`tenes` is a typo, `fíjate` is tuteo, `fijate` voseo);
- words and phrases (`che`, `wey`, `parce`, `cachai`): matched with accents folded, because people write
  `orale` as often as `órale`.

Every match is on whole words. Each marker carries a weight per region: 3 for a marker of one region, 2 for
voseo (shared with Colombian paisa speech) and for words that lean to one region, 1 for words several regions
share. A text goes to the region with the highest score when that score is at least 2 and no other region
ties it; otherwise, and always for a text without markers, to the default (neutral) variety.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

REGIONS = ("rioplatense", "colombian", "mexican", "chilean", "caribbean", "andean")
NEUTRAL = "neutral"  # neutral/peninsular: what a text without markers gets
MIN_SCORE = 2  # one shared word alone (weight 1) never decides a region

Weights = dict[str, int]

# Voseo (River Plate, also Paisa Colombian and Central American): present tense and imperatives, as written.
_RIOPLATENSE_VOSEO = (
    "sos, tenés, querés, sabés, podés, hacés, decís, venís, andás, hablás, mirás, pensás, llamás,"
    " trabajás, vivís, salís, dormís, pedís, sentís, creés, comés, jugás, contás, volvés,"
    " entendés, conocés, necesitás, esperás, buscás, escuchás, preguntás, laburás, ponés, traés,"
    " leés, escribís, elegís, preferís, seguís, vendés, corrés, tirás, mirá, vení, decí, tomá,"
    " andá, escuchá, pará, salí, poné, traé, hacé, tené, fijate, decime, contame, escuchame,"
    " pasame, avisame, mandame, llamame, imaginate, acordate, quedate, sentate"
)
# Chilean voseo: -ís for -er verbs, -ái for -ar verbs.
_CHILEAN_VOSEO = (
    "tenís, querís, sabís, podís, hacís, comís, erís, estái, cachái, andái, hablái, pensái, creís, vai"
)

_MARKERS: dict[str, Weights] = {}
_ACCENTED: set[str] = set()


def _add(words: str, weights: Weights, *, accented: bool = False) -> None:
    for word in (w.strip() for w in words.split(",")):
        if word:
            _MARKERS.setdefault(word, {}).update(weights)
            if accented:
                _ACCENTED.add(word)


_add(_RIOPLATENSE_VOSEO, {"rioplatense": 2, "colombian": 1}, accented=True)
_add(_CHILEAN_VOSEO, {"chilean": 3}, accented=True)
_add("vos", {"rioplatense": 2, "colombian": 1})

# Words of one region (weight 3).
_add(
    "che, boludo, boluda, boludos, boludez, pibe, piba, pibes, pibas, laburo, laburar, quilombo, bondi,"
    " guita, morfar, chabón, chabon, copado, copada, fiaca, trucho, boliche, garpar, chamuyo, pucho, pileta,"
    " heladera, remera, pochoclo, nafta, cheto, gurí, re lindo, re bueno, qué sé yo, afanar, flashear",
    {"rioplatense": 3},
)
_add(
    "wey, güey, guey, órale, chido, chida, neta, la neta, qué padre, padrísimo, no manches, no mames, cuate,"
    " cuates, chavo, chava, chavos, híjole, ándale, chingón, chingona, pinche, carnal, chamaco, escuincle,"
    " escuincles, popote, chafa, gacho, qué pedo, morra, mero mero",
    {"mexican": 3},
)
_add(
    "parce, parcero, parcera, parceros, bacano, bacana, chimba, qué chimba, berraco, verraco, guaro, guayabo,"
    " paila, mamera, jartera, sumercé, quiubo, quibo, juepucha, hágale, ome",
    {"colombian": 3},
)
_add(
    "po, cachai, cachái, weón, weon, weona, wn, weá, wea, fome, pololo, polola, pololear, al tiro, altiro,"
    " carrete, carretear, copete, la raja, cuático, cuática, wena, sipo, nopo, flaite, polerón",
    {"chilean": 3},
)
_add(
    "chamo, chama, asere, qué bolá, wepa, boricua, jevo, jeva, bochinche, mangú, tíguere, janguear, jangueo,"
    " corillo, zafacón, pariguayo, naguará, cónchale, qué lo que, carajito, carajitos, mi pana, acere",
    {"caribbean": 3},
)
_add(
    "causita, mi causa, jato, chibolo, chibola, huachafo, achorado, tombo, jerma, manyas, misio, ñaño, ñaña,"
    " achachay, arrarray, chuchaqui, mashi, jailón, imilla, llokalla, chuta",
    {"andean": 3},
)

# Words that lean to one region (weight 2) or that several share (weight 1).
_add("bancar", {"rioplatense": 2})
_add("cabros, cabro chico", {"chilean": 2})
_add("chicharrón, polas", {"colombian": 2})
# Also ordinary Spanish words (a mine, a headland, a patch, a crude lie): never enough alone.
_add("mina, minas", {"rioplatense": 1})
_add("morro, mande", {"mexican": 1})
_add("parche, pola", {"colombian": 1})
_add("burda", {"caribbean": 1})
_add("taita, pata, causa", {"andean": 1})
_add("huevón, huevon", {"chilean": 2, "andean": 1, "caribbean": 1})
_add("bacán, bacan", {"chilean": 2, "andean": 2, "colombian": 1})
_add("pana, panas", {"caribbean": 2, "andean": 1})
_add("vaina", {"caribbean": 2, "colombian": 2})
_add("chévere", {"caribbean": 1, "colombian": 1, "andean": 1})
_add("chamba, chambear", {"mexican": 1, "andean": 1})
_add("ahorita", {"mexican": 1, "caribbean": 1, "andean": 1})
_add("nomás", {"mexican": 1, "andean": 1})
_add("guagua", {"caribbean": 1, "andean": 1, "chilean": 1})
_add("chela, chelas", {"mexican": 1, "andean": 1, "chilean": 1})
_add("palta", {"chilean": 1, "andean": 1, "rioplatense": 1})
_add("pucha", {"chilean": 1, "andean": 1})
_add("al toque", {"andean": 1, "rioplatense": 1})
_add("piola", {"rioplatense": 1, "chilean": 1})
_add("birra, birras", {"rioplatense": 1})
_add("luca, lucas", {"chilean": 1, "rioplatense": 1})
_add("dale", {"rioplatense": 1, "caribbean": 1})
_add("qué onda", {"mexican": 1, "rioplatense": 1, "chilean": 1})
_add("harto, harta", {"chilean": 1, "andean": 1})
_add("marica", {"colombian": 1, "caribbean": 1})
_add("tinto", {"colombian": 1})
_add("camello, camellar", {"colombian": 1})
_add("de una", {"colombian": 1, "andean": 1})
_add("chamaca, lana", {"mexican": 1})
_add("arrecho, arrecha", {"caribbean": 1, "colombian": 1})
_add("choclo", {"andean": 1, "chilean": 1, "rioplatense": 1})
_add("cancha", {"andean": 1})
_add("yapa", {"andean": 1, "rioplatense": 1})
_add("jama", {"andean": 1})
_add("mijo, mija", {"colombian": 1, "mexican": 1, "caribbean": 1})

for _markers in _MARKERS.values():
    assert set(_markers) <= set(REGIONS), _markers


def fold(text: str) -> str:
    """Lower case without accents (ñ kept: `año` is not `ano`)."""
    out = []
    for ch in unicodedata.normalize("NFD", text.lower()):
        if unicodedata.combining(ch) and ch != "\u0303":  # keep the tilde of ñ
            continue
        out.append(ch)
    return unicodedata.normalize("NFC", "".join(out))


def _pattern(markers: list[str]) -> re.Pattern[str]:
    # Longest first, so that "qué chimba" wins over "chimba"; whole words only.
    alternatives = "|".join(re.escape(m) for m in sorted(markers, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")


_ACCENTED_PATTERN = _pattern(sorted(_ACCENTED))
_FOLDED = {fold(m): m for m in _MARKERS if m not in _ACCENTED}
_FOLDED_PATTERN = _pattern(sorted(_FOLDED))


@dataclass
class Detection:
    region: str  # one of REGIONS, or NEUTRAL
    markers: list[str]  # the markers found, in the order of the text, each once, as listed (lower case)
    scores: dict[str, int] = field(default_factory=dict)  # region -> summed weight, regions with markers only


def detect(text: str) -> Detection:
    """The region whose markers the text carries most; NEUTRAL when none, or when it is a tie."""
    found: list[tuple[int, str]] = []  # (position, marker)
    taken: list[tuple[int, int]] = []
    lowered = text.lower()
    for m in _ACCENTED_PATTERN.finditer(lowered):
        found.append((m.start(), m.group()))
        taken.append(m.span())
    # Folding keeps the length of the text except where it drops accents: match on a folded copy made
    # word by word so that positions stay comparable enough for ordering.
    folded = fold(text)
    for m in _FOLDED_PATTERN.finditer(folded):
        if any(a < m.end() and m.start() < b for a, b in taken):
            continue  # part of a voseo form already counted
        found.append((m.start(), _FOLDED[m.group()]))
    found.sort()

    markers: list[str] = []
    for _, marker in found:
        if marker not in markers:
            markers.append(marker)
    scores: dict[str, int] = {}
    for marker in markers:
        for region, weight in _MARKERS[marker].items():
            scores[region] = scores.get(region, 0) + weight
    region = NEUTRAL
    if scores:
        ranked = sorted(scores.values(), reverse=True)
        best = ranked[0]
        if best >= MIN_SCORE and (len(ranked) == 1 or ranked[1] < best):
            region = max(scores, key=lambda r: scores[r])
    return Detection(region=region, markers=markers, scores=scores)
