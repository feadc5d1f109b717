"""Spanish text as it is spoken: numbers, money, dates, times, ordinals, abbreviations and symbols in words.

F5-TTS speaks the characters it is given; "$1.500" or "14:30" come out as noise or get skipped. `normalize`
writes them out in Spanish with num2words, with the choices that differ between regions:

- the decimal separator: Mexico and the Caribbean write 1,500.50 (and say "punto"), the rest 1.500,50
  ("coma");
- what "$" means: pesos in Argentina, Uruguay, Mexico, Colombia, Chile, the Dominican Republic and Cuba,
  dollars in Ecuador (the Andean region's "$") and in the neutral default; S/ soles, Bs bolivianos, € euros;
- the first of the month: "primero de mayo" in the Americas, "uno de mayo" in the neutral/peninsular default.

Only digits, the symbols and the abbreviations listed here are touched; words are left as written, so voseo
(`vos tenés`) and regional vocabulary reach the model unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from num2words import num2words

from worker.spanish.regions import NEUTRAL

DOT_DECIMAL = {"mexican", "caribbean"}  # 1,500.50; the others write 1.500,50
MONTHS = (
    "enero febrero marzo abril mayo junio julio agosto septiembre octubre noviembre diciembre".split()  # noqa: SIM905
)
# what "$" is, per region: (singular, plural, cents)
DOLLAR_SIGN = {
    "rioplatense": ("peso", "pesos", "centavos"),
    "colombian": ("peso", "pesos", "centavos"),
    "mexican": ("peso", "pesos", "centavos"),
    "chilean": ("peso", "pesos", "centavos"),
    "caribbean": ("peso", "pesos", "centavos"),
    "andean": ("dólar", "dólares", "centavos"),
    NEUTRAL: ("dólar", "dólares", "centavos"),
}
CURRENCIES = {  # written sign or code -> (singular, plural, cents)
    "US$": ("dólar", "dólares", "centavos"),
    "USD": ("dólar", "dólares", "centavos"),
    "€": ("euro", "euros", "céntimos"),
    "EUR": ("euro", "euros", "céntimos"),
    "S/.": ("sol", "soles", "céntimos"),
    "S/": ("sol", "soles", "céntimos"),
    "PEN": ("sol", "soles", "céntimos"),
    "Bs.": ("boliviano", "bolivianos", "centavos"),
    "Bs": ("boliviano", "bolivianos", "centavos"),
    "BOB": ("boliviano", "bolivianos", "centavos"),
    "ARS": ("peso argentino", "pesos argentinos", "centavos"),
    "MXN": ("peso mexicano", "pesos mexicanos", "centavos"),
    "COP": ("peso colombiano", "pesos colombianos", "centavos"),
    "CLP": ("peso chileno", "pesos chilenos", "centavos"),
    "UYU": ("peso uruguayo", "pesos uruguayos", "centavos"),
    "DOP": ("peso dominicano", "pesos dominicanos", "centavos"),
}
ABBREVIATIONS = {  # as written (case matters: "No." is not "no.") -> spoken
    "EE. UU.": "Estados Unidos",
    "EE.UU.": "Estados Unidos",
    "p. ej.": "por ejemplo",
    "Sra.": "señora",
    "Sr.": "señor",
    "Srta.": "señorita",
    "Dra.": "doctora",
    "Dr.": "doctor",
    "Lic.": "licenciado",
    "Ing.": "ingeniero",
    "Prof.": "profesor",
    "Uds.": "ustedes",
    "Ud.": "usted",
    "Vd.": "usted",
    "Av.": "avenida",
    "Avda.": "avenida",
    "etc.": "etcétera",
    "aprox.": "aproximadamente",
    "tel.": "teléfono",
    "Tel.": "teléfono",
    "pág.": "página",
    "n.º": "número",
    "nº": "número",
    "Nº": "número",
    "núm.": "número",
    "Cía.": "compañía",
}
UNITS = {  # after a number: (singular, plural)
    "km/h": ("kilómetro por hora", "kilómetros por hora"),
    "km": ("kilómetro", "kilómetros"),
    "kg": ("kilo", "kilos"),
    "cm": ("centímetro", "centímetros"),
    "mm": ("milímetro", "milímetros"),
    "ml": ("mililitro", "mililitros"),
    "m²": ("metro cuadrado", "metros cuadrados"),
    "m2": ("metro cuadrado", "metros cuadrados"),
    "m": ("metro", "metros"),
    "g": ("gramo", "gramos"),
    "l": ("litro", "litros"),
    "min": ("minuto", "minutos"),
    "hs": ("hora", "horas"),
    "h": ("hora", "horas"),
    "GB": ("gigabyte", "gigabytes"),
    "MB": ("megabyte", "megabytes"),
}
SYMBOLS = {"&": "y", "+": "más", "=": "igual a", "@": "arroba", "#": "numeral", "×": "por"}
# Nouns ending in -a that are masculine: "un día", not "una día".
MASCULINE_A = {"día", "días", "mapa", "mapas", "problema", "problemas", "programa", "programas", "sistema"}
FUNCTION_WORDS = {
    "de",
    "del",
    "y",
    "o",
    "a",
    "al",
    "en",
    "por",
    "para",
    "con",
    "que",
    "es",
    "son",
    "se",
    "no",
}
ROMAN = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}

_NUM = r"\d[\d.,]*\d|\d"  # a number as written, separators included
# A number of more digits is an id (an order, an account, a card): Spanish speakers read it digit by digit.
# (num2words also fails from 28 digits on, and int() from 4300.)
MAX_DIGITS = 15
DIGITS = "cero uno dos tres cuatro cinco seis siete ocho nueve".split()  # noqa: SIM905


def digit_by_digit(written: str) -> str:
    """'4711-0815' -> 'cuatro siete uno uno cero ocho uno cinco': every digit, nothing else."""
    return " ".join(DIGITS[int(c)] for c in written if c.isdecimal())


def _long_numbers_by_digit(text: str) -> str:
    def sub(m: re.Match[str]) -> str:
        written = m.group()
        return digit_by_digit(written) if sum(c.isdecimal() for c in written) > MAX_DIGITS else written

    return re.sub(_NUM, sub, text)


def cardinal(n: int) -> str:
    words = str(num2words(n, lang="es"))
    # num2words writes "veintiuno mil"; Spanish says "veintiún mil", "treinta y un millones".
    return re.sub(
        r"\b(\w*?)uno (mil|millones)\b",
        lambda m: f"{m.group(1)}{'ún' if m.group(1) else 'un'} {m.group(2)}",
        words,
    )


def _before_noun(words: str, noun: str) -> str:
    """`veintiuno` + noun -> `veintiún`/`veintiuna`; `un millón` + noun -> `un millón de`."""
    feminine = noun.endswith(("a", "as")) and noun not in MASCULINE_A
    if words == "uno" or words.endswith(" uno"):
        words = words[:-3] + ("una" if feminine else "un")
    elif words.endswith("iuno"):
        words = words[:-3] + ("una" if feminine else "ún")
    if words.endswith(("millón", "millones")):
        words += " de"
    return words


def _parse_number(written: str, region: str) -> tuple[int, str | None]:
    """'1.500,50' -> (1500, '50'): the integer part and the decimal digits as written.

    With both marks the last one is the decimal mark, whatever the region. With one kind only, it groups
    thousands when used twice (1.000.000) or when it is not the region's decimal mark and three digits
    follow (1.500 in Buenos Aires, 1,500 in Mexico City); otherwise it is a decimal mark (2.5 anywhere).
    """
    if "," in written and "." in written:
        decimal = "," if written.rfind(",") > written.rfind(".") else "."
    elif "," in written or "." in written:
        mark = "," if "," in written else "."
        region_decimal = "." if region in DOT_DECIMAL else ","
        tail = written.rpartition(mark)[2]
        if written.count(mark) > 1 or (mark != region_decimal and len(tail) == 3):
            return int(written.replace(mark, "")), None
        decimal = mark
    else:
        return int(written), None
    whole, _, frac = written.rpartition(decimal)  # "0..,.90": the digits after the last mark
    return int(whole.replace(",", "").replace(".", "") or "0"), frac or None


def _number_words(written: str, region: str) -> str:
    whole, frac = _parse_number(written, region)
    words = cardinal(whole)
    if frac:
        point = "punto" if region in DOT_DECIMAL or "," not in written else "coma"
        zeros = len(frac) - len(frac.lstrip("0"))
        rest = frac.lstrip("0")
        words += f" {point} " + " ".join(["cero"] * zeros + ([cardinal(int(rest))] if rest else []))
    return words


def _money(amount: str, names: tuple[str, str, str], region: str) -> str:
    whole, frac = _parse_number(amount, region)
    singular, plural, cents_name = names
    noun = singular if whole == 1 else plural
    text = f"{_before_noun(cardinal(whole), noun)} {noun}"
    if frac and int(frac):
        cents = int(frac.ljust(2, "0")[:2])
        text += f" con {_before_noun(cardinal(cents), cents_name)} {cents_name}"
    return text


def _ordinal(n: int, feminine: bool, short: bool) -> str:
    words = str(num2words(n, lang="es", to="ordinal")) or "cero"  # num2words gives "" for 0
    if feminine:
        words = " ".join(w[:-1] + "a" if w.endswith("o") else w for w in words.split())
    elif short and words.endswith(("primero", "tercero")):
        words = words[:-1]  # "1er piso": primer, tercer
    return words


def _roman(numeral: str) -> int:
    total = 0
    for a, b in zip(numeral, [*numeral[1:], ""], strict=True):
        value = ROMAN[a]
        total += -value if b and ROMAN[b] > value else value
    return total


def _keep_stop(spoken: str) -> Callable[[re.Match[str]], str]:
    def sub(m: re.Match[str]) -> str:
        return spoken + ("." if m.group().endswith(".") and m.group(1) is not None else "")

    return sub


def _time(m: re.Match[str], text: str) -> str:
    hour, minute = int(m.group("h")), int(m.group("m"))
    if hour > 24 or minute > 59:
        return m.group()
    suffix = (m.group("ampm") or "").replace(" ", "").replace(".", "").lower()
    spoken_hour = hour
    part = ""
    if suffix in ("am", "pm"):
        spoken_hour = hour % 12 or 12
        if suffix == "am":
            part = " de la noche" if hour == 12 or hour < 5 else " de la mañana"
        else:
            part = " del mediodía" if hour == 12 else (" de la tarde" if hour < 8 else " de la noche")
    words = "una" if spoken_hour == 1 else cardinal(spoken_hour)
    if m.group("hs"):  # "20:00 hs": las veinte horas
        words += (f" y {cardinal(minute)}" if minute else "") + " horas"
    else:
        words += " en punto" if minute == 0 else f" y {cardinal(minute)}"
    before = text[: m.start()].rstrip().lower()
    if not before.endswith((" la", " las")) and before not in ("la", "las"):
        words = ("la " if spoken_hour == 1 else "las ") + words
    stop = "." if suffix and m.group("ampm").endswith(".") and not text[m.end() :].strip() else ""
    return words + part + stop


def normalize(text: str, region: str = NEUTRAL) -> str:
    """The text with its numbers, money, dates, times, ordinals, abbreviations and symbols spoken out."""
    for written, spoken in sorted(ABBREVIATIONS.items(), key=lambda kv: -len(kv[0])):
        # "etc." at the end of the text also ends it: keep that full stop.
        text = re.sub(rf"(?<!\w){re.escape(written)}(?!\w)(?=(\s*$)?)", _keep_stop(spoken), text)

    text = _long_numbers_by_digit(text)  # first: every number left has at most MAX_DIGITS digits
    text = re.sub(r"\bsiglo ([IVXLCDM]+)\b", lambda m: f"siglo {cardinal(_roman(m.group(1)))}", text)

    # Money: a sign or code before or after the amount.
    signs = "|".join(re.escape(s) for s in sorted(CURRENCIES, key=len, reverse=True))

    def money(m: re.Match[str]) -> str:
        sign = m.group("sign") or m.group("sign2")
        names = DOLLAR_SIGN.get(region, DOLLAR_SIGN[NEUTRAL]) if sign == "$" else CURRENCIES[sign]
        return _money(m.group("amount") or m.group("amount2"), names, region)

    text = re.sub(
        rf"(?:(?P<sign>{signs}|\$)\s?(?P<amount>{_NUM})|(?P<amount2>{_NUM})\s?(?P<sign2>€|{signs}|\$)(?!\w))",
        money,
        text,
    )

    # Dates: 25/12/2024, 1-5-24.
    def date(m: re.Match[str]) -> str:
        day, month, year = int(m.group(1)), int(m.group(2)), m.group(3)
        if not (1 <= day <= 31 and 1 <= month <= 12):
            return m.group()
        first = "uno" if region == NEUTRAL else "primero"
        words = f"{first if day == 1 else cardinal(day)} de {MONTHS[month - 1]}"
        if year:
            y = int(year) + (2000 if len(year) == 2 else 0)
            words += f" de {num2words(y, lang='es', to='year')}"
        return words

    text = re.sub(r"\b(\d{1,2})/(\d{1,2})(?:/(\d{4}|\d{2}))?\b(?!/\d)", date, text)
    text = re.sub(r"\b(\d{1,2})-(\d{1,2})-(\d{4})\b", date, text)
    if region != NEUTRAL:
        text = re.sub(rf"\b1 de ({'|'.join(MONTHS)})\b", r"primero de \1", text)

    # Times: 14:30, 9:05 am, 20:00 hs.
    text = re.sub(
        r"\b(?P<h>\d{1,2}):(?P<m>\d{2})(?P<hs>\s?(?:hs|h)\b)?(?P<ampm>\s?(?:[ap]\.\s?m\.|[ap]m\b))?",
        lambda m: _time(m, text),
        text,
        flags=re.IGNORECASE,
    )

    # Ordinals: 1º, 2.ª, 1er, 3ra, 2do, 4to.
    def ordinal(m: re.Match[str]) -> str:
        suffix = m.group(2).lstrip(".")
        return _ordinal(int(m.group(1)), suffix in ("ª", "a", "ra", "da", "ta"), suffix == "er")

    text = re.sub(r"\b(\d{1,3})(\.?[ºª]|er|ra|ro|da|do|ta|to|vo|va|no|na|mo|ma)(?!\w)", ordinal, text)

    # Percentages and temperatures.
    text = re.sub(rf"({_NUM})\s?%", lambda m: f"{_number_words(m.group(1), region)} por ciento", text)
    text = re.sub(
        rf"(-?)({_NUM})\s?[°º]\s?C\b",
        lambda m: ("menos " if m.group(1) else "") + f"{_number_words(m.group(2), region)} grados",
        text,
    )

    # Units after a number.
    units = "|".join(re.escape(u) for u in sorted(UNITS, key=len, reverse=True))

    def unit(m: re.Match[str]) -> str:
        whole, frac = _parse_number(m.group(1), region)
        singular, plural = UNITS[m.group(2)]
        noun = singular if whole == 1 and not frac else plural
        words = _number_words(m.group(1), region)
        return f"{_before_noun(words, noun) if not frac else words} {noun}"

    text = re.sub(rf"\b({_NUM})\s?({units})(?!\w)", unit, text)

    # "3 x 4" and negative numbers.
    text = re.sub(r"(?<=\d)\s?[x×]\s?(?=\d)", " por ", text)
    text = re.sub(rf"(?<![\w\d])-({_NUM})", r"menos \1", text)

    # What is left: plain numbers, "uno" adjusted to the noun after it.
    def number(m: re.Match[str]) -> str:
        written = m.group(1)
        words = _number_words(written, region)
        noun = m.group(2)
        if noun and noun.strip().lower() not in FUNCTION_WORDS and _parse_number(written, region)[1] is None:
            words = _before_noun(words, noun.strip().lower())
        return words + (noun or "")

    text = re.sub(rf"(?<![\w])({_NUM})(?![\w])(\s+[^\W\d_]+)?", number, text)

    sub_symbol: Callable[[re.Match[str]], str] = lambda m: f" {SYMBOLS[m.group()]} "  # noqa: E731
    text = re.sub("|".join(re.escape(s) for s in SYMBOLS), sub_symbol, text)
    return re.sub(r"[ \t]{2,}", " ", text).strip()
