"""A task plugin as a user would write one: AU intensity on the FACS letter scale, registered on import.

Its description and its label parser are all it takes; `mtl train` / `mtl eval` import it through the config key
``tasks.plugins: [facs_intensity]`` (with this folder on PYTHONPATH).
"""

from __future__ import annotations

from dataclasses import dataclass

from mtl.tasks import BadRow, Regression, register

SCALE = {"0": 0, "A": 1, "B": 2, "C": 3, "D": 4, "E": 5}  # absent, trace, slight, marked, severe, maximum


@dataclass(frozen=True)
class FacsIntensity(Regression):
    """One letter per AU (0, A..E); -1 in any AU: no label on the frame."""

    def parse_row(self, fields: list[str]) -> tuple[tuple[float, ...], bool]:
        codes = [f.strip().upper() for f in fields]
        for name, code in zip(self.columns, codes):
            if code != "-1" and code not in SCALE:
                raise BadRow(f"{name} {code!r} is not a FACS intensity 0, A..E (nor the invalid code -1)")
        if "-1" in codes:
            return (0.0,) * self.width, False
        return tuple(float(SCALE[c]) for c in codes), True

    def format_row(self, values, valid: bool) -> str:
        letters = {v: k for k, v in SCALE.items()}
        return ",".join(letters[int(x)] for x in values) if valid else ",".join(["-1"] * self.width)


TASK = register(
    FacsIntensity(
        name="auint",
        title="AU intensity",
        columns=("AU6_int", "AU12_int"),
        folders=("AU_Intensity_Challenge",),
        submission="AU_INT.txt",
        low=0.0,
        high=5.0,
        invalid=-1.0,
    )
)
