"""The model over a stream of face crops: each frame through the backbone once, then the temporal trunk and heads
over overlapping windows of the run's clip length; a frame's outputs are averaged over the windows that hold it.

Frames without a face enter as imageless frames (``has_image`` False): the trunk sees the learned mask token there,
as in training, and still predicts them from their neighbours. Memory stays bounded: features are kept only until
every window that needs them has run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mtl.device import autocast
from mtl.model.network import MultiTaskNet
from mtl.tasks import Task


@dataclass
class FrameOutput:
    index: int
    values: dict[str, np.ndarray]  # task -> what its predictions hold (values or probabilities), averaged


class WindowedPredictor:
    """``push(crop or None)`` per frame, then ``finish()``; both return the frames whose outputs are final."""

    def __init__(
        self,
        model: MultiTaskNet,
        tasks: tuple[Task, ...],
        normalise,
        window: int,
        stride: int,
        device: torch.device,
        encode_batch: int = 32,
        window_batch: int = 32,
    ) -> None:
        if not 1 <= stride <= window:
            raise ValueError(f"stride {stride} must be within 1..window ({window})")
        self.model, self.tasks, self.normalise, self.device = model, tasks, normalise, device
        self.window, self.stride = window, stride
        self.encode_batch, self.window_batch = encode_batch, window_batch
        self.pending: list[torch.Tensor | None] = []  # crops not yet encoded
        self.base = 0  # index of the first frame still held
        self.feats: list[torch.Tensor | None] = []  # [D] per held frame, None where no image
        self.has_image: list[bool] = []
        self.sums: list[np.ndarray | None] = []  # per held frame: every task's values side by side, summed over windows
        self.counts: list[int] = []
        self.next_start = 0
        self.sizes = [t.width for t in tasks]  # widths of the tasks' values in a row of sums

    @property
    def encoded(self) -> int:
        return self.base + len(self.feats)

    def push(self, crop: torch.Tensor | None) -> list[FrameOutput]:
        self.pending.append(crop)
        if len(self.pending) < self.encode_batch:
            return []
        self._encode()
        return self._run_ready(final=False)

    def finish(self) -> list[FrameOutput]:
        self._encode()
        return self._run_ready(final=True)

    @torch.no_grad()
    def _encode(self) -> None:
        if not self.pending:
            return
        images = [c for c in self.pending if c is not None]
        out = None
        if images:
            x = self.normalise(torch.stack(images).to(self.device))
            with autocast(self.device):  # bf16 on a GPU
                out = self.model.encoder(x).float().cpu()
        k = 0
        for c in self.pending:
            if c is None:
                self.feats.append(None)
                self.has_image.append(False)
            else:
                self.feats.append(out[k])
                self.has_image.append(True)
                k += 1
            self.sums.append(None)
            self.counts.append(0)
        self.pending = []

    def _starts(self, final: bool) -> list[int]:
        starts = []
        s = self.next_start
        while s < self.encoded:
            if s + self.window > self.encoded and not final:
                break
            starts.append(s)
            if s + self.window >= self.encoded and final:
                s = self.encoded  # this window reaches the end: none after it
                break
            s += self.stride
        self.next_start = s
        return starts

    @torch.no_grad()
    def _run(self, starts: list[int]) -> None:
        dim = next((f.numel() for f in self.feats if f is not None), None)
        if dim is None:
            dim = self.model.masker.mask_token.numel()
        t = self.window
        feats = torch.zeros(len(starts), t, dim)
        has_image = torch.zeros(len(starts), t, dtype=torch.bool)
        pad = torch.ones(len(starts), t, dtype=torch.bool)
        for b, s in enumerate(starts):
            for j in range(min(t, self.encoded - s)):
                f = self.feats[s + j - self.base]
                if f is not None:
                    feats[b, j] = f
                    has_image[b, j] = True
                pad[b, j] = False
        feats, has_image, pad = feats.to(self.device), has_image.to(self.device), pad.to(self.device)
        with autocast(self.device):
            out = self.model.from_features(feats, has_image & ~pad, pad)
        parts = [t.predict(out[t.name].float()) for t in self.tasks]
        self.sizes = [p.shape[-1] for p in parts]
        values = torch.cat(parts, -1)
        values = values.cpu().numpy()
        for b, s in enumerate(starts):
            for j in range(min(t, self.encoded - s)):
                i = s + j - self.base
                self.sums[i] = values[b, j] if self.sums[i] is None else self.sums[i] + values[b, j]
                self.counts[i] += 1

    def _run_ready(self, final: bool) -> list[FrameOutput]:
        starts = self._starts(final)
        for k in range(0, len(starts), self.window_batch):
            self._run(starts[k : k + self.window_batch])
        # Frames before the next window's start are in no later window.
        done = (self.encoded if final else self.next_start) - self.base
        outputs = []
        edges = np.cumsum([0, *self.sizes])
        for i in range(done):
            v = self.sums[i] / self.counts[i]
            values = {t.name: v[lo:hi] for t, lo, hi in zip(self.tasks, edges[:-1], edges[1:])}
            outputs.append(FrameOutput(self.base + i, values))
        del self.feats[:done], self.has_image[:done], self.sums[:done], self.counts[:done]
        self.base += done
        return outputs
