"""Drop known-harmless log records of the stack by logger name + message pattern; everything else still shows.

    drop_log_records({"vllm.model_executor.model_loader.reload.layerwise": r"Failed to load weights$"})

The filter sits on the named logger itself (records are filtered where they are created), so a new warning from
the same logger, or the same words from another logger, still reach the console.
"""

from __future__ import annotations

import logging
import re


class DropMatching(logging.Filter):
    """Rejects records whose formatted message matches `pattern` (re.search)."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def drop_log_records(rules: dict[str, str]) -> None:
    """Attach one DropMatching per {logger name: message pattern}; calling it again adds nothing twice."""
    for name, pattern in rules.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMatching) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(DropMatching(pattern))
