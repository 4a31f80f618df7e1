"""Derive role markers from a Jinja chat template by rendering messages whose contents are sentinels.

For a conversation  U1 A1 U2 A2  (sentinel contents) the template renders

    conversation_start + hls + U1 + hle + als + A1 + ale + hls + U2 + hle + als + A2 + ale

so, reading the text between sentinels:

    after A2                  -> assistant_line_end (ale)
    between A1 and U2         -> ale + human_line_start (hls)
    before U1                 -> conversation_start + hls
    between U1 and A1         -> human_line_end (hle) + assistant_line_start (als), split by the generation
                                 prompt: render([U1], add_generation_prompt=True) minus render([U1]) = als
    [system S, U1, A1]        -> system_line_start before S, system_line_end between S and U1 (minus hls)

Then the derived markers must reproduce the template's own rendering of a prompt exactly; otherwise derivation
fails with what was found and the fields to set by hand.

Templates that render the final assistant turn differently from earlier ones (Qwen3 adds an empty
'<think>\\n\\n</think>\\n\\n' block to the last assistant turn only) are rendered like the earlier turns; the
difference is recorded in derivation_notes and printed (see docs/prepare.md).
"""

from __future__ import annotations

from rlhf_ray.data.template import ASSISTANT, HUMAN, SYSTEM, TEMPLATE_ROLE, ConversationTemplate, default_stop_ids

SENTINELS = {"U1": "RlhfRayUserOne", "A1": "RlhfRayAssistantOne", "U2": "RlhfRayUserTwo",
             "A2": "RlhfRayAssistantTwo", "S": "RlhfRaySystemText"}
HAND_FIELDS = ("human_line_start, human_line_end, assistant_line_start, assistant_line_end, end_of_assistant, "
               "conversation_start (and system_line_start, system_line_end to use system messages)")


class TemplateDerivationError(ValueError):
    """The markers could not be read off the chat template; the message shows what was found."""


def _chat(messages: list[tuple[str, str]]) -> list[dict]:
    return [{"role": TEMPLATE_ROLE[role], "content": content} for role, content in messages]


def _renderer(tokenizer, chat_template: str | None):
    template = chat_template or getattr(tokenizer, "chat_template", None)

    def render(messages: list[tuple[str, str]], add_generation_prompt: bool = False, **variables) -> str:
        return tokenizer.apply_chat_template(_chat(messages), chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **variables)

    return template, render


def _fail(source: str, problem: str, rendered: str | None = None) -> TemplateDerivationError:
    shown = f"\n  the template rendered: {rendered!r}" if rendered is not None else ""
    return TemplateDerivationError(
        f"{source}: could not derive the role markers from the chat template: {problem}.{shown}\n"
        f"  Set these fields by hand in {source}: {HAND_FIELDS}.")


def _positions(text: str, names: list[str], source: str) -> dict[str, tuple[int, int]]:
    """(start, end) of each sentinel; each must appear exactly once, in the given order."""
    found, last = {}, -1
    for name in names:
        sentinel = SENTINELS[name]
        count = text.count(sentinel)
        start = text.find(sentinel)
        if count != 1 or start < last:
            raise _fail(source, f"message {name} ({sentinel!r}) appears {count} times"
                                f"{' out of order' if count == 1 else ''} (expected once, in order)", text)
        found[name] = (start, start + len(sentinel))
        last = start
    return found


def derive_template(tokenizer, chat_template: str | None, system_message: str | None,
                    source: str = "conversation template") -> ConversationTemplate:
    """Read the markers off `chat_template` (or the tokenizer's own when None) and check them; see module doc."""
    template_text, render = _renderer(tokenizer, chat_template)
    if not template_text:
        raise TemplateDerivationError(
            f"{source}: chat_template is null and the tokenizer has no chat template of its own; write one into "
            f"{source} (e.g. rlhf_ray/assets/templates/mistral-v1-sp.json shows a Llama-2/Mistral style one)")
    notes: list[str] = []
    s = SENTINELS
    try:
        convo = [(HUMAN, s["U1"]), (ASSISTANT, s["A1"]), (HUMAN, s["U2"]), (ASSISTANT, s["A2"])]
        full = render(convo)
        no_gen, with_gen = render(convo[:1]), render(convo[:1], add_generation_prompt=True)
    except Exception as exc:  # jinja2 errors, raise_exception() inside templates
        raise _fail(source, f"rendering a human/assistant conversation raised {type(exc).__name__}: {exc}") from None
    at = _positions(full, ["U1", "A1", "U2", "A2"], source)

    assistant_line_end = full[at["A2"][1]:]
    between_a1_u2 = full[at["A1"][1]:at["U2"][0]]
    if not assistant_line_end.strip():
        raise _fail(source, f"nothing but {assistant_line_end!r} follows the last assistant turn, so an assistant "
                            f"turn has no end marker to learn", full)
    if not between_a1_u2.startswith(assistant_line_end):
        raise _fail(source, f"the text after the last assistant turn ({assistant_line_end!r}) does not also end the "
                            f"earlier assistant turn (found {between_a1_u2!r} before the next human turn)", full)
    human_line_start = between_a1_u2[len(assistant_line_end):]
    before_u1 = full[:at["U1"][0]]
    if not before_u1.endswith(human_line_start):
        raise _fail(source, f"the first human turn starts with {before_u1!r}, not with the human line start "
                            f"{human_line_start!r} found before the second", full)
    conversation_start = before_u1[:len(before_u1) - len(human_line_start)]

    between_u1_a1 = full[at["U1"][1]:at["A1"][0]]
    between_u2_a2 = full[at["U2"][1]:at["A2"][0]]
    if not with_gen.startswith(no_gen):
        raise _fail(source, f"add_generation_prompt=True does not append to the prompt (without: {no_gen!r}, "
                            f"with: {with_gen!r})")
    assistant_line_start = with_gen[len(no_gen):]
    if not between_u1_a1.endswith(assistant_line_start):
        raise _fail(source, f"the generation prompt {assistant_line_start!r} is not how an assistant turn starts "
                            f"(found {between_u1_a1!r} between a human turn and the assistant's)", full)
    human_line_end = between_u1_a1[:len(between_u1_a1) - len(assistant_line_start)]
    if between_u2_a2 != between_u1_a1:
        extra = between_u2_a2[len(between_u1_a1):] if between_u2_a2.startswith(between_u1_a1) else between_u2_a2
        notes.append(f"the chat template renders the final assistant turn differently from earlier ones "
                     f"(extra {extra!r}); every assistant turn is rendered like the earlier ones. To train with that "
                     f"text in every turn, append it to assistant_line_start (it is then part of every prompt).")

    system_line_start = system_line_end = None
    try:
        with_system = render([(SYSTEM, s["S"]), (HUMAN, s["U1"]), (ASSISTANT, s["A1"])])
    except Exception:  # templates that refuse a system role
        with_system = ""
    if with_system.count(s["S"]) == 1 and with_system.find(s["S"]) < with_system.find(s["U1"]):
        sys_at = _positions(with_system, ["S", "U1"], source)
        system_line_start = with_system[:sys_at["S"][0]]
        tail = with_system[sys_at["S"][1]:sys_at["U1"][0]]
        if tail.endswith(human_line_start):
            system_line_end = tail[:len(tail) - len(human_line_start)]
        else:
            system_line_start = None
    if system_line_start is None:
        notes.append("the chat template does not render system messages; a system message is put before the "
                     "first human turn's content, separated by a blank line")
        if system_message:
            raise _fail(source, f"system_message is set ({system_message!r}) but the template does not render "
                                f"system messages; set system_message to null")

    end_of_assistant = assistant_line_end.rstrip() or assistant_line_end
    template = ConversationTemplate(
        human_line_start=human_line_start, human_line_end=human_line_end,
        assistant_line_start=assistant_line_start, assistant_line_end=assistant_line_end,
        end_of_assistant=end_of_assistant, conversation_start=conversation_start,
        system_line_start=system_line_start, system_line_end=system_line_end,
        system_message=system_message, chat_template=chat_template,
        stop_ids=default_stop_ids(tokenizer, end_of_assistant), notes=tuple(notes),
    )
    mismatch = check_against_chat_template(tokenizer, template)
    if mismatch:
        raise _fail(source, f"the derived markers do not reproduce the template's rendering: {mismatch}")
    system_text = template.render([(HUMAN, "x")])[0]
    system_text = system_text[:len(system_text) - len(human_line_start + "x" + human_line_end)]
    position = len(tokenizer(system_text, add_special_tokens=False)["input_ids"]) if system_text else 0
    template = _replace(template, end_of_system_line_position=position)
    for note in notes:
        print(f"note: {source}: {note}")
    return template


def _replace(template: ConversationTemplate, **changes) -> ConversationTemplate:
    from dataclasses import replace

    return replace(template, **changes)


def check_against_chat_template(tokenizer, template: ConversationTemplate, history: bool = True) -> str | None:
    """Render a prompt both ways; return a description of the first difference, or None when equal.

    Prompts are compared (a conversation ending in a human turn, generation prompt added): that is where every
    template agrees with the markers, including those that treat the final assistant turn specially. With
    history=False only a one-turn prompt is compared, which also accepts markers for Qwen3's non-thinking mode
    (the empty think block in assistant_line_start, as enable_thinking=False renders the generation prompt).
    """
    template_text, render = _renderer(tokenizer, template.chat_template)
    if not template_text:
        return None
    s = SENTINELS
    messages = [(HUMAN, s["U1"]), (ASSISTANT, s["A1"]), (HUMAN, s["U2"])] if history else [(HUMAN, s["U1"])]
    if template.system_message and template.supports_system:
        messages = [(SYSTEM, template.system_message)] + messages
    ours = template.render(messages, add_generation_prompt=True)[0]
    try:
        expected = render(messages, add_generation_prompt=True)
        if ours != expected and not history and ours == render(messages, True, enable_thinking=False):
            return None
    except Exception as exc:
        return f"the chat template raised {type(exc).__name__}: {exc}"
    if ours == expected:
        return None
    cut = next((i for i, (a, b) in enumerate(zip(ours, expected)) if a != b), min(len(ours), len(expected)))
    return f"markers give {ours[max(0, cut - 20):cut + 40]!r}, the template {expected[max(0, cut - 20):cut + 40]!r}"
