"""`load_tokenizer(dir)`: the tokenizer AutoTokenizer builds, without importing AutoTokenizer where it can.

Importing AutoTokenizer imports every model family's modeling code through its docstrings, and with it torch's
dynamo and DTensor: ~1.5 s of a CPU's time here, on every job's start-up, for a driver that only encodes and
decodes. When tokenizer_config.json names a class that transformers exports (and no remote code), that class is
what AutoTokenizer would pick; it is imported alone. Anything else goes through AutoTokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path


def _named_class(directory: Path):
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    name = config.get("tokenizer_class") if isinstance(config, dict) else None
    if not isinstance(name, str) or config.get("auto_map"):
        return None
    import transformers

    try:
        cls = getattr(transformers, name, None)
    except ImportError:                 # a backend it needs is missing: AutoTokenizer says which
        return None
    return cls if isinstance(cls, type) and hasattr(cls, "from_pretrained") else None


def load_tokenizer(directory: str | Path, **kwargs):
    """A tokenizer from a local HF directory; the same class and settings as AutoTokenizer.from_pretrained."""
    cls = _named_class(Path(directory))
    if cls is None:
        from transformers import AutoTokenizer

        cls = AutoTokenizer
    return cls.from_pretrained(str(directory), **kwargs)
