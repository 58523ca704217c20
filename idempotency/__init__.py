"""Apply each event's effect exactly once, however often a broker delivers it."""

__version__ = "0.2.0.dev0"
