"""The three ABAW tasks of Aff-Wild2: valence-arousal, expression, action units."""

from __future__ import annotations

from mtl.tasks.base import register
from mtl.tasks.kinds import MultiLabel, Regression, SingleLabel

EXPR_NAMES = ("Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise", "Other")
AU_NAMES = ("AU1", "AU2", "AU4", "AU6", "AU7", "AU10", "AU12", "AU15", "AU23", "AU24", "AU25", "AU26")

VA = register(
    Regression(
        name="va",
        title="VA",
        columns=("valence", "arousal"),
        folders=("VA_Estimation_Challenge",),
        submission="VA.txt",
        mtl_track=("valence", "arousal"),
        test_lists=("Valence_Arousal_Estimation_Challenge", "VA_Estimation_Challenge", "VA"),
        low=-1.0,
        high=1.0,
        invalid=-5.0,
    )
)
EXPR = register(
    SingleLabel(
        name="expr",
        title="EXPR",
        columns=EXPR_NAMES,
        folders=("EXPR_Recognition_Challenge", "EXPR_Classification_Challenge"),  # the second: an older release
        submission="EXPR.txt",
        mtl_track=("expression",),
        test_lists=(
            "Expression_Recognition_Challenge",
            "Expression_Classification_Challenge",
            "EXPR_Recognition_Challenge",
            "EXPR_Classification_Challenge",
            "EXPR",
        ),
        header_aliases=(EXPR_NAMES[:7],),  # the older release has 7 classes (no "Other"); codes 0..6 mean the same
        prediction="expression",
        invalid=-1,
    )
)
AU = register(
    MultiLabel(
        name="au",
        title="AU",
        columns=AU_NAMES,
        folders=("AU_Detection_Challenge",),
        submission="AU.txt",
        mtl_track=("aus",),
        test_lists=("Action_Unit_Detection_Challenge", "AU_Detection_Challenge", "AU"),
        invalid=-1,
    )
)
