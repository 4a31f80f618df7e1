"""Conversation templates: the role markers a chat template puts around each turn, and rendering with spans.

A chat template (Jinja) turns messages into one string. To train on a conversation we also need to know which
characters of that string are assistant output. Instead of searching the rendered text for the content (fragile:
the same words may appear in the prompt), we render conversations ourselves from the template's *role markers*,
so every piece's character span is known by construction:

    conversation_start                                        (no system message: e.g. '<s>', or nothing)
      or system_line_start + system + system_line_end         (with one)
    human_line_start + content + human_line_end               (each human turn)
    assistant_line_start + content + assistant_line_end       (each assistant turn; the labels cover
                                                               content + end_of_assistant, the head of
                                                               assistant_line_end, e.g. '<|im_end|>' of '<|im_end|>\\n')

The markers come from a conversation-template config file (JSON, the seed's fields). On a first run it needs only
`chat_template` (null: the tokenizer's own) and `system_message`; the markers are derived by rendering messages
with sentinel contents (see template_derive.py), checked against the template's own rendering, and written back
to the file, where they can be read and edited.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

# Normalised roles used everywhere in rlhf_ray.data; the seed's 'human' is the template's 'user'.
HUMAN, ASSISTANT, SYSTEM = "human", "assistant", "system"
TEMPLATE_ROLE = {HUMAN: "user", ASSISTANT: "assistant", SYSTEM: "system"}
MARKER_FIELDS = ("human_line_start", "human_line_end", "assistant_line_start", "assistant_line_end",
                 "conversation_start", "end_of_assistant")


class TemplateConfigFile(BaseModel):
    """The JSON conversation-template config, as the user writes it. Every marker field may be left out (derived)."""

    model_config = ConfigDict(extra="forbid")

    chat_template: str | None = None
    system_message: str | None = None
    human_line_start: str | list[int] | None = None
    human_line_end: str | list[int] | None = None
    assistant_line_start: str | list[int] | None = None
    assistant_line_end: str | list[int] | None = None
    end_of_assistant: str | list[int] | None = None
    conversation_start: str | list[int] | None = None
    system_line_start: str | list[int] | None = None
    system_line_end: str | list[int] | None = None
    end_of_system_line_position: int | None = None
    stop_ids: list[int] | None = None
    derivation_notes: list[str] | None = None


@dataclass(frozen=True)
class ConversationTemplate:
    """Resolved role markers (all plain strings) and the rendering that knows where each turn lies.

    Picklable, so tokenization workers receive it as is.
    """

    human_line_start: str
    human_line_end: str
    assistant_line_start: str
    assistant_line_end: str
    end_of_assistant: str
    conversation_start: str = ""
    system_line_start: str | None = None   # None: the template cannot render a system message
    system_line_end: str | None = None
    system_message: str | None = None
    chat_template: str | None = None
    stop_ids: tuple[int, ...] = ()
    end_of_system_line_position: int = 0
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if not self.assistant_line_end.startswith(self.end_of_assistant):
            raise ValueError(f"end_of_assistant {self.end_of_assistant!r} must be the start of assistant_line_end "
                             f"{self.assistant_line_end!r} (it is the labeled part of the assistant line end)")

    @property
    def supports_system(self) -> bool:
        return self.system_line_start is not None

    def render(self, messages: list[tuple[str, str]], add_generation_prompt: bool = False
               ) -> tuple[str, list[tuple[int, int, int]]]:
        """Render normalised messages [(role, content)] to text.

        Returns (text, assistant_spans): one (char_start, char_end, message_index) per assistant message, covering
        its content and end_of_assistant — the characters a model must learn to produce. A leading system message
        replaces the configured system_message; when the template cannot render system messages, the system text
        is put before the first human turn's content, separated by a blank line.
        """
        system = self.system_message
        first = 0
        if messages and messages[0][0] == SYSTEM:
            system, first = messages[0][1], 1
        pieces: list[str] = []
        spans: list[tuple[int, int, int]] = []
        cursor = 0
        prepend_to_human = None
        if system and self.supports_system:
            pieces.append(self.system_line_start + system + self.system_line_end)
        else:
            pieces.append(self.conversation_start)
            prepend_to_human = system or None
        cursor = len(pieces[0])
        for index in range(first, len(messages)):
            role, content = messages[index]
            if role == HUMAN:
                if prepend_to_human:
                    content, prepend_to_human = f"{prepend_to_human}\n\n{content}", None
                text = self.human_line_start + content + self.human_line_end
            elif role == ASSISTANT:
                start = cursor + len(self.assistant_line_start)
                end = start + len(content) + len(self.end_of_assistant)
                spans.append((start, end, index))
                text = self.assistant_line_start + content + self.assistant_line_end
            else:
                raise ValueError(f"message {index}: role {role!r} cannot appear here (system only comes first)")
            pieces.append(text)
            cursor += len(text)
        if add_generation_prompt:
            pieces.append(self.assistant_line_start)
        return "".join(pieces), spans

    def to_config(self) -> dict[str, Any]:
        """The JSON config fields, in a readable order (what is written back to the file)."""
        return {
            "chat_template": self.chat_template,
            "system_message": self.system_message,
            "human_line_start": self.human_line_start,
            "human_line_end": self.human_line_end,
            "assistant_line_start": self.assistant_line_start,
            "assistant_line_end": self.assistant_line_end,
            "end_of_assistant": self.end_of_assistant,
            "conversation_start": self.conversation_start,
            "system_line_start": self.system_line_start,
            "system_line_end": self.system_line_end,
            "end_of_system_line_position": self.end_of_system_line_position,
            "stop_ids": list(self.stop_ids),
            "derivation_notes": list(self.notes),
        }


# ---------------------------------------------------------------- the config file


def read_template_file(path: str | Path) -> TemplateConfigFile:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--conversation_template_config {path}: file not found; start from one in "
                         f"rlhf_ray/assets/templates/ (only chat_template and system_message are needed)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object with chat_template, system_message, ...; "
                         f"got {type(raw).__name__}")
    try:
        return TemplateConfigFile.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        known = ", ".join(TemplateConfigFile.model_fields)
        raise ValueError(f"{path}: field {where!r}: {err['msg']} (known fields: {known})") from None


def write_template_file(path: str | Path, template: ConversationTemplate) -> bool:
    """Write the resolved markers back (atomically). Returns False, with a note, when the file is read-only."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(template.to_config(), indent=2, ensure_ascii=False) + "\n")
        tmp.replace(path)
        return True
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        print(f"note: could not write the derived markers back to {path} ({exc}); they are derived on every run")
        return False


def _as_text(value: str | list[int] | None, tokenizer) -> str | None:
    """The seed stores markers as token-id lists; accept those and turn them into text."""
    if value is None or isinstance(value, str):
        return value
    return tokenizer.decode(value, skip_special_tokens=False)


def load_template(path: str | Path, tokenizer, write_back: bool = True) -> ConversationTemplate:
    """Read a conversation-template config; derive the missing markers from the chat template and write them back.

    When the file already has every marker, they are used as written (so hand-edited markers win), and a mismatch
    with the chat template's own rendering is reported as a note.
    """
    from rlhf_ray.data.template_derive import check_against_chat_template, derive_template

    path = Path(path)
    config = read_template_file(path)
    values = {name: _as_text(getattr(config, name), tokenizer) for name in
              MARKER_FIELDS + ("system_line_start", "system_line_end")}
    complete = all(values[name] is not None for name in MARKER_FIELDS)
    if not complete:
        template = derive_template(tokenizer, config.chat_template, config.system_message, source=str(path))
        if write_back:
            write_template_file(path, template)
        return template
    stop_ids = tuple(config.stop_ids) if config.stop_ids else default_stop_ids(tokenizer, values["end_of_assistant"])
    try:
        template = ConversationTemplate(
            **values, system_message=config.system_message, chat_template=config.chat_template, stop_ids=stop_ids,
            end_of_system_line_position=config.end_of_system_line_position or 0,
            notes=tuple(config.derivation_notes or ()),
        )
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    mismatch = check_against_chat_template(tokenizer, template, history=False)
    if mismatch:
        print(f"note: {path}: the markers do not reproduce the chat template's rendering ({mismatch}); they are used "
              f"as written. Delete the marker fields to re-derive them.")
    return template


def default_stop_ids(tokenizer, end_of_assistant: str) -> tuple[int, ...]:
    """Token ids that end an assistant turn: the last token of end_of_assistant, and the eos token."""
    ids = set()
    if end_of_assistant:
        encoded = tokenizer(end_of_assistant, add_special_tokens=False)["input_ids"]
        if encoded:
            ids.add(int(encoded[-1]))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))
