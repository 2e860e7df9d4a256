"""The unpruned model: every visual token reaches every language-model layer."""

from __future__ import annotations

from operators.pruning.base import BeforeLLM, Selection, VisualItem, keep_all


class KeepAll(BeforeLLM):
    name = "none"
    keeps_everything = True

    def select(self, items: list[VisualItem], budget: int | None) -> list[Selection]:
        return [keep_all(item.segments.patches) for item in items]
