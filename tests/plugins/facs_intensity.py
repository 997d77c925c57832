"""A task plugin as a user would write one: AU intensity on the FACS letter scale, registered on import.

Its description and its label parser are all it takes; `mtl train` / `mtl eval` import it through the config key
``tasks.plugins: [facs_intensity]`` (with this folder on PYTHONPATH). Its loss has an option of its own, set as
``loss.tasks.auint.mse=0.5`` and checked like any config key, with no field for it in the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from mtl.fields import Float
from mtl.tasks import BadRow, LossOptions, Regression, register

SCALE = {"0": 0, "A": 1, "B": 2, "C": 3, "D": 4, "E": 5}  # absent, trace, slight, marked, severe, maximum


class IntensityLoss(LossOptions):
    """``loss.tasks.auint.*``: CCC (what is scored) plus ``mse`` times the squared error in units of the scale."""

    mse: Float = Field(0.0, ge=0)


class CCCPlusMSE(nn.Module):
    def __init__(self, ccc: nn.Module, mse: float, scale: float) -> None:
        super().__init__()
        self.ccc, self.mse, self.scale = ccc, mse, scale

    def forward(self, output: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        width = output.shape[-1]
        err = ((output.float() - target.float()).reshape(-1, width) / self.scale) ** 2
        w = weight.float().unsqueeze(-1)
        return self.ccc(output, target, weight) + self.mse * (w * err).sum() / (w.sum() * width).clamp_min(1.0)


@dataclass(frozen=True)
class FacsIntensity(Regression):
    """One letter per AU (0, A..E); -1 in any AU: no label on the frame."""

    options_model: ClassVar[type[LossOptions]] = IntensityLoss

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

    def loss(self, options: IntensityLoss, stats) -> nn.Module:
        ccc = super().loss(options, stats)
        return CCCPlusMSE(ccc, options.mse, self.high - self.low) if options.mse else ccc


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
