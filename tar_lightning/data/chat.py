"""The one chat template of the project, used by refusal training, TAR, attacks and evaluation.

A single-turn exchange is rendered as ``user : <request> assistant : <response> <eos>``. Every
word of the template is an ordinary word of the built-in world's vocabulary, so the
word-level tokenizer covers it. Training text and evaluation prompts both come from the
functions below, so a model is always prompted exactly as it was trained.
"""

from __future__ import annotations

USER = "user :"
ASSISTANT = "assistant :"


def chat_prompt(request: str) -> str:
    """Render a request up to the point where the assistant's response starts."""
    return f"{USER} {request.strip()} {ASSISTANT}"


def chat_text(request: str, response: str, eos_token: str) -> str:
    """Render a full exchange: the prompt, the response and the end-of-sequence token."""
    return f"{chat_prompt(request)} {response.strip()} {eos_token}"


def completion_start(tokenizer, prompt_text: str, full_ids: list[int]) -> int:
    """Return the index in ``full_ids`` of the first token after ``prompt_text``'s own tokens.

    The prompt is tokenized on its own and compared token by token, so a tokenizer that
    merges text across the boundary still yields the first position that differs.
    """
    prompt_ids = tokenizer(prompt_text)["input_ids"]
    start = 0
    while start < min(len(prompt_ids), len(full_ids)) and prompt_ids[start] == full_ids[start]:
        start += 1
    return max(start, 1)
