"""The built-in models (package data): vdiff-tiny and its APD verifier vdiff-tiny-ar.

``tasks.py`` is the task suite they are trained on (and the benchmarks measure them on),
``train.py`` reproduces them; ``MODEL_DIR`` and ``VERIFIER_DIR`` are where they are installed.
"""

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "vdiff-tiny"
VERIFIER_DIR = Path(__file__).resolve().parent / "vdiff-tiny-ar"
