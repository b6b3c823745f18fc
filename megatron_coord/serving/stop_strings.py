"""OpenAI ``stop`` strings applied to text that arrives piece by piece (streamed or not)."""

from __future__ import annotations


class StopMatcher:
    """Applies OpenAI ``stop`` strings to text arriving piece by piece.

    ``feed`` returns the text that can be sent now: everything up to a stop string (which is
    not sent, unless ``include_stop`` -- vLLM's ``include_stop_str_in_output``), holding back a
    tail that could still be the start of one. ``stopped`` says a stop string was found;
    ``flush`` returns what was held back once generation ends.
    """

    def __init__(self, stops: list[str], include_stop: bool = False) -> None:
        self.stops = stops
        self.include_stop = include_stop
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buffer = self.pending + text
        start, end = first_stop(buffer, self.stops)
        if start >= 0:
            self.stopped = True
            self.pending = ""
            return buffer[: end if self.include_stop else start]
        hold = self._held_tail(buffer)
        self.pending = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _held_tail(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:length]):
                    best = length
                    break
        return best


def first_stop(text: str, stops: list[str]) -> tuple[int, int]:
    """Where ``text`` is cut: (start, end) of the stop string that is complete first (the one
    ending earliest, the longest of those), or (-1, -1).

    "Complete first" is what a generation that stops on a stop string does: with stops "c" and
    "aca", the text "ac..." stops at "c" before "aca" could ever be generated. Deciding by end
    position makes the result the same however the text was split into pieces.
    """
    best_end, best_start = len(text) + 1, -1
    for stop in stops:
        start = text.find(stop)
        if start < 0:
            continue
        end = start + len(stop)
        if end < best_end or (end == best_end and start < best_start):
            best_end, best_start = end, start
    return (best_start, best_end) if best_start >= 0 else (-1, -1)
