"""Spanish text normalisation (worker/spanish/normalize.py): what each written form becomes, by region."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("num2words")  # part of the F5-TTS runtime (scripts/install_f5tts.sh)

from worker.spanish.normalize import normalize


@pytest.mark.parametrize(
    ("region", "text", "spoken"),
    [
        # money: "$" by country, cents, and the decimal separator of each region
        ("rioplatense", "Vos tenés $1.500,50.", "Vos tenés mil quinientos pesos con cincuenta centavos."),
        ("mexican", "Son $1,500.50", "Son mil quinientos pesos con cincuenta centavos"),
        ("andean", "Son $20", "Son veinte dólares"),  # Ecuador's dollar
        ("neutral", "Son $1", "Son un dólar"),
        ("chilean", "Cuesta $21.000", "Cuesta veintiún mil pesos"),
        ("andean", "S/ 30,50 o Bs 5", "treinta soles con cincuenta céntimos o cinco bolivianos"),
        ("colombian", "15 € o US$ 2", "quince euros o dos dólares"),
        ("neutral", "1.000.000 €", "un millón de euros"),
        # decimals and percentages
        ("rioplatense", "el 2,5 % y 0,05", "el dos coma cinco por ciento y cero coma cero cinco"),
        ("caribbean", "el 2.5% y 0.05", "el dos punto cinco por ciento y cero punto cero cinco"),
        # dates: "primero" in the Americas, "uno" in the peninsular default
        ("colombian", "el 1/5/1990", "el primero de mayo de mil novecientos noventa"),
        ("neutral", "el 1/5/1990", "el uno de mayo de mil novecientos noventa"),
        ("chilean", "el 1 de mayo", "el primero de mayo"),
        ("neutral", "el 25/12/24", "el veinticinco de diciembre de dos mil veinticuatro"),
        # times
        ("neutral", "a las 14:30", "a las catorce y treinta"),
        ("neutral", "a la 1:05", "a la una y cinco"),
        ("caribbean", "es 9:00 am", "es las nueve en punto de la mañana"),
        ("mexican", "sale 8:15 p. m.", "sale las ocho y quince de la noche."),
        ("rioplatense", "a las 20 hs", "a las veinte horas"),
        # ordinals, with gender and the short masculine form
        ("neutral", "el 1er piso, la 3ra casa, llegó 2º", "el primer piso, la tercera casa, llegó segundo"),
        ("neutral", "la 21.ª edición", "la vigésima primera edición"),
        # agreement of "uno" with the noun after it
        ("neutral", "21 años, 31 personas, 1 día", "veintiún años, treinta y una personas, un día"),
        # abbreviations and symbols
        (
            "neutral",
            "El Sr. Pérez y la Dra. Gómez, de EE. UU., etc.",
            "El señor Pérez y la doctora Gómez, de Estados Unidos, etcétera.",
        ),
        (
            "neutral",
            "a 120 km/h, 1 km, 2,5 kg",
            "a ciento veinte kilómetros por hora, un kilómetro, dos coma cinco kilos",
        ),
        ("neutral", "3 x 4 = 12, A & B, -3 °C", "tres por cuatro igual a doce, A y B, menos tres grados"),
        ("neutral", "el siglo XXI", "el siglo veintiuno"),
    ],
)
def test_spoken_form(region: str, text: str, spoken: str) -> None:
    assert normalize(text, region) == spoken


def test_words_are_left_as_written() -> None:
    """Voseo and slang reach the model unchanged; only the digits around them change."""
    text = "Che, vos tenés 3 perros y andás re cansado, ¿sabés?"
    assert normalize(text, "rioplatense") == "Che, vos tenés tres perros y andás re cansado, ¿sabés?"
    plain = "Órale wey, ¿cachai lo que te digo, parce?"
    assert normalize(plain, "mexican") == plain


def test_no_digits_left() -> None:
    text = "El 15/08/2023 a las 10:45 pagué $3.200,75 por 2 kg de café (el 12% más) en la 5ta tienda."
    for region in ("rioplatense", "mexican", "neutral"):
        assert not re.search(r"\d", normalize(text, region)), normalize(text, region)


def test_a_long_id_is_read_digit_by_digit() -> None:
    """An order or account number is read as its digits (num2words cannot name 28 digits or more, and
    int() refuses 4300), never raising: an error here would fail the job as a worker fault, retried."""
    order = "1234567890" * 4
    spoken = normalize(f"Su pedido {order} llega hoy.")
    words = "uno dos tres cuatro cinco seis siete ocho nueve cero"
    assert spoken == f"Su pedido {' '.join([words] * 4)} llega hoy."
    assert normalize("9" * 40) == " ".join(["nueve"] * 40)
    assert normalize("id 1" + "0" * 5000).split() == ["id", "uno", *["cero"] * 5000]
    # with separators too, and 15 digits are still a number
    assert normalize("4111.1111.1111.1111") == " ".join(["cuatro"] + ["uno"] * 15)
    assert normalize("999999999999999").startswith("novecientos noventa y nueve billones")


def test_mixed_separators_do_not_raise() -> None:
    """A slip of the keyboard: the digits after the last mark are the decimals."""
    assert normalize("0..,.90", "andean") == "cero coma noventa"


def test_ordinal_zero_is_spoken() -> None:
    """num2words has no ordinal for 0 (it gives ""): "0º" must not vanish from the text."""
    assert normalize("a 0º") == "a cero"
