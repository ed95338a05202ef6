"""Turn a context and a question into token ids, with or without the chat template.

The split between the compressed context and the question must survive the chat template: the
user message is rendered with a marker between context and question, and the rendered text is cut
at the marker. Everything before it (system prompt, user header, context) is the context to
compress; everything after it (question, end of turn, assistant header) is fed after compression.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .errors import PromptError

__all__ = ["EncodedPrompt", "chat_template_available", "encode_prompt", "instruction_ids", "instructions",
           "render_prompt"]

_MARK = "\u2063<<chunkkv-split>>\u2063"


@dataclass
class EncodedPrompt:
    """Token ids of one prompt.

    Attributes:
        context_ids: the part compressed in question-agnostic mode (special tokens included).
        question_ids: what follows it (may be empty: generation then starts from the context).
        full_ids: the whole prompt tokenized in one piece: what query-aware mode compresses, and
            exactly the prompt the benchmark's official script would feed.
        chat: whether the chat template was applied.
    """

    context_ids: list[int]
    question_ids: list[int]
    full_ids: list[int]
    chat: bool


def chat_template_available(tokenizer: Any) -> bool:
    """True if the tokenizer has a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(
    tokenizer: Any, context: str, question: str, use_chat: bool, system: str | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> tuple[str, str]:
    """``(context_text, question_text)``: the prompt text cut at the context/question boundary.

    Without the chat template this is ``(context, question)``. With it, the user message
    ``context + question`` (after an optional system message) is rendered with the generation
    prompt and cut where the context ends. ``template_kwargs`` go to ``apply_chat_template``
    (e.g. ``{"enable_thinking": False}`` for Qwen3).
    """
    if not use_chat:
        return context, question
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": context + _MARK + question}
    ]
    rendered = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
    )
    if rendered.count(_MARK) != 1:
        raise PromptError("the chat template changed the prompt so that the context/question boundary was lost")
    head, tail = rendered.split(_MARK)
    return head, tail


def encode_prompt(
    tokenizer: Any, context: str, question: str, use_chat: bool, system: str | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> EncodedPrompt:
    """Tokenize a prompt for compression.

    Without the chat template the context gets the tokenizer's special tokens (BOS) and the
    question none; a rendered chat template already contains its special tokens, so nothing is
    added. ``context_ids`` and ``question_ids`` are tokenized separately (the question-agnostic
    split), ``full_ids`` in one piece, so they can differ by a token at the junction.
    """
    head, tail = render_prompt(tokenizer, context, question, use_chat, system, template_kwargs)
    add_special = not use_chat

    def ids(text: str, special: bool) -> list[int]:
        return list(tokenizer(text, add_special_tokens=special)["input_ids"]) if text else []

    context_ids = ids(head, add_special)
    question_ids = ids(tail, False)
    full_ids = ids(head + tail, add_special)
    if not full_ids:
        raise PromptError("the prompt encodes to no tokens")
    return EncodedPrompt(context_ids, question_ids, full_ids, use_chat)


def instruction_ids(tokenizer: Any, instruction: str, separator: str = "\n\n", chat: bool | None = None) -> torch.Tensor:
    """Token ids ``[n]`` a scoring pass feeds after the context: ``separator + instruction``, then the
    end of the user's turn and the assistant's opening when the context was rendered with the chat
    template (the way a question is asked of a chat-templated context), else a newline.

    ``chat`` None: when the tokenizer has a chat template.
    """
    suffix = "\n"
    if chat is None:
        chat = chat_template_available(tokenizer)
    if chat:
        marker = "\x00chunkkv\x00"
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], add_generation_prompt=True, tokenize=False
        )
        if marker in rendered:
            suffix = rendered.split(marker, 1)[1]
    return tokenizer(separator + instruction + suffix, add_special_tokens=False, return_tensors="pt")["input_ids"][0]


def instructions(tokenizer: Any, chat: bool | None = None) -> Callable[[str], torch.Tensor]:
    """``instruction -> token ids`` for the scoring passes of one context (see :func:`instruction_ids`),
    each instruction tokenized once."""
    seen: dict[str, torch.Tensor] = {}

    def ids(instruction: str) -> torch.Tensor:
        if instruction not in seen:
            seen[instruction] = instruction_ids(tokenizer, instruction, chat=chat)
        return seen[instruction]

    return ids


_TOO_LONG = "sequence-length-is-longer-than-the-specified-maximum"


@contextlib.contextmanager
def long_text(tokenizer: Any) -> Iterator[Any]:
    """Tokenize a text longer than the model's window *on purpose* (a haystack that is cut to
    length afterwards) without transformers' "Token indices sequence length is longer than the
    specified maximum sequence length" warning. Only inside the block: a prompt that really is too
    long still warns afterwards."""
    flags = getattr(tokenizer, "deprecation_warnings", None)
    if not isinstance(flags, dict):
        yield tokenizer
        return
    had, before = _TOO_LONG in flags, flags.get(_TOO_LONG)
    flags[_TOO_LONG] = True  # what transformers sets once it has warned
    try:
        yield tokenizer
    finally:
        if had:
            flags[_TOO_LONG] = before
        else:
            flags.pop(_TOO_LONG, None)

