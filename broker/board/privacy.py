"""How a patient is named on the wall view, a screen the public may see (setting ``board_wall_patient``).

``initials``: the initials of the family and given names with the last digits of the Patient ID
("M.E. ·4567"), enough for staff to tell two patients apart and too little for a passer-by to know who
is there; ``full``: name and ID; ``none``: nothing. The desk view (a token holder's screen) is not
affected: it shows full names.
"""

from __future__ import annotations

from typing import Literal

WallPatient = Literal["initials", "full", "none"]


def initials(person_name: str) -> str:
    """``FAMILY^GIVEN^MIDDLE`` (DICOM PN, alphabetic group) as ``F.G.M.``; empty for an empty name."""
    alphabetic = person_name.split("=")[0]
    letters = [word[0].upper() for part in alphabetic.split("^")[:3] for word in part.split() if word]
    return "".join(f"{letter}." for letter in letters)


def last_digits(patient_id: str, digits: int) -> str:
    """The last ``digits`` characters of the Patient ID after a middle dot (none for 0 or no ID)."""
    if digits <= 0 or not patient_id:
        return ""
    return f"·{patient_id[-digits:]}"


def wall_patient(person_name: str, patient_id: str, mode: WallPatient, digits: int) -> str:
    """The patient as the wall view shows them (see the module's docstring)."""
    if mode == "none":
        return ""
    if mode == "full":
        family, _, given = person_name.split("=")[0].partition("^")
        name = f"{family}, {given.split('^')[0]}" if given.split("^")[0] else family
        return f"{name} ({patient_id})" if patient_id else name
    return " ".join(part for part in (initials(person_name), last_digits(patient_id, digits)) if part)
