"""`mnistlab lab TOPIC`: the study notes' principles as programs that check themselves and draw a figure.

Each lab module has TITLE (one line) and `run(out: Path | None) -> list[Check]`: it prints nothing
itself; the CLI prints its checks (PASS/FAIL with the numbers) and exits 1 if any failed. A lab that
also writes sounds (cocktail-party) has `sound_folder(out) -> Path`, and the CLI prints that folder.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

# topic -> module; the order is the notes' order
LABS = {
    "linear-map": "mnistlab.labs.linear_map",
    "gradient-descent": "mnistlab.labs.gradient_descent",
    "backprop": "mnistlab.labs.backprop",
    "activations": "mnistlab.labs.activations",
    "fft": "mnistlab.labs.fft",
    "attention": "mnistlab.labs.attention",
    "masking": "mnistlab.labs.masking",
    "phase": "mnistlab.labs.phase",
    "cocktail-party": "mnistlab.labs.cocktail_party",
}


@dataclass
class Check:
    """One verified claim: what, whether it held, and the numbers that say so."""

    claim: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.claim}: {self.detail}"


def load_lab(topic: str) -> ModuleType:
    """The lab module for `topic` (a key of LABS)."""
    return importlib.import_module(LABS[topic])
