"""What each scenario reaches (counts, sizes, times): printed as it happens and repeated
in the terminal summary, so a quiet `make test` run still shows them."""

from __future__ import annotations

FIGURES: list[str] = []


def say(text: str) -> None:
    print(text)
    FIGURES.extend(text.strip("\n").splitlines())
