"""One picture per input: valence and arousal over time, the predicted expression as a colour band, and where
a face was found."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from mtl.tasks import get_task  # noqa: E402

EXPRESSIONS = get_task("expr").columns


def plot_timeline(
    path: Path, title: str, time_s: np.ndarray, va: np.ndarray, expression: np.ndarray, face: np.ndarray
) -> Path:
    time_s = np.asarray(time_s, dtype=float)
    step = float(np.median(np.diff(time_s))) if len(time_s) > 1 else 1.0
    edges = np.append(time_s, time_s[-1] + step) if len(time_s) else np.zeros(1)
    fig, (ax_va, ax_ex, ax_face) = plt.subplots(
        3, 1, figsize=(10, 4.8), sharex=True, gridspec_kw={"height_ratios": [4, 1, 0.6]}
    )
    ax_va.plot(time_s, va[:, 0], label="valence", lw=1.2)
    ax_va.plot(time_s, va[:, 1], label="arousal", lw=1.2)
    ax_va.axhline(0, color="grey", lw=0.5)
    ax_va.set_ylim(-1.05, 1.05)
    ax_va.legend(loc="upper right", fontsize=8)
    ax_va.set_title(title)

    cmap = ListedColormap(plt.get_cmap("tab10").colors[: len(EXPRESSIONS)])
    ax_ex.pcolormesh(edges, [0, 1], expression[None, :], cmap=cmap, vmin=-0.5, vmax=len(EXPRESSIONS) - 0.5)
    ax_ex.set_yticks([])
    ax_ex.set_ylabel("expr", rotation=0, ha="right", va="center")
    handles = [Patch(color=cmap(i), label=n) for i, n in enumerate(EXPRESSIONS)]
    ax_ex.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=len(EXPRESSIONS), fontsize=7)

    ax_face.pcolormesh(edges, [0, 1], face[None, :].astype(float), cmap="Greys", vmin=0, vmax=1.5)
    ax_face.set_yticks([])
    ax_face.set_ylabel("face", rotation=0, ha="right", va="center")
    ax_face.set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
