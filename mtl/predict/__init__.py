"""`mtl predict`: a trained run applied to raw videos or folders of frames, one CSV row per frame.

decode (frames) -> detect (faces) -> track (the main face) -> crop (square, as training crops) -> windows (the
model over overlapping clips) -> write (CSV) / plot (PNG); ``pipeline`` joins them for one input, ``cli`` for many.
"""

DETECTORS: tuple[str, ...] = ("auto", "hog", "haar", "yunet")  # here, so `mtl --help` imports no OpenCV
