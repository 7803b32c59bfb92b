"""`--reasoning-parser`: a reasoning model's output split into its thinking (`reasoning_content`)
and its answer (`content`), whole or as it streams. The markers are the engine's
(asyncpp/engine/reasoning.py), which also holds structured output back until the thinking ends.

The output starts inside the reasoning unless the prompt already closed it (Qwen3 with
enable_thinking=False writes an empty <think></think> into the prompt). A leading start
marker is dropped; text up to the end marker is reasoning, the rest content; an output that
never ends its reasoning is all reasoning (as vLLM's parsers read them)."""
from __future__ import annotations

from dataclasses import dataclass

from asyncpp.engine.reasoning import ReasoningMarkers
from asyncpp.engine.stop_checker import hold_back_length


@dataclass(slots=True)
class ReasoningSplitter:
    markers: ReasoningMarkers
    reasoning: bool = True  # inside the thinking now
    _started: bool = False  # past the point where a start marker may open the output
    _held: str = ""  # text that may still be (part of) a marker

    def feed(self, delta: str) -> tuple[str, str]:
        """(reasoning, content) text that `delta` completes."""
        text = self._held + delta
        self._held = ""
        reasoning = ""
        if self.reasoning and not self._started:
            stripped = text.lstrip()
            start = self.markers.start
            if start.startswith(stripped):  # may still become the start marker
                self._held = text
                return "", ""
            self._started = True
            if stripped.startswith(start):
                text = stripped[len(start):]
        if self.reasoning:
            end = self.markers.end
            at = text.find(end)
            if at < 0:
                keep = hold_back_length(text, [end])
                self._held = text[len(text) - keep:] if keep else ""
                return text[:len(text) - keep], ""
            reasoning, text = text[:at], text[at + len(end):]
            self.reasoning = False
        return reasoning, text

    def finish(self) -> tuple[str, str]:
        """What was held back, once the output is complete."""
        held, self._held = self._held, ""
        if self.reasoning and not self._started and held.strip() == self.markers.start:
            return "", ""
        return (held, "") if self.reasoning else ("", held)


def split_reasoning(text: str, markers: ReasoningMarkers, reasoning: bool = True) -> tuple[str, str]:
    """(reasoning, content) of a whole output."""
    splitter = ReasoningSplitter(markers, reasoning)
    first, second = splitter.feed(text), splitter.finish()
    return first[0] + second[0], first[1] + second[1]
