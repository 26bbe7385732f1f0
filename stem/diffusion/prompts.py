r"""Text conditioning: prompt -> CLIP text-encoder hidden states, with an explicit length policy.

A prompt given through run.py is an OmegaConf string: `${...}` in it is an interpolation. To write it
literally escape it, `data.prompt='a \${x} cat'` (run.py refuses an unresolvable one with that hint and
passes an escaped one through unchanged)."""

from __future__ import annotations

import logging

import torch

from stem.core.errors import PromptError, check_choice

log = logging.getLogger(__name__)

OVERFLOW_POLICIES = ("error", "truncate")


@torch.no_grad()
def encode_prompt(model, prompt: str, overflow: str = "error") -> torch.Tensor:
    """Encode `prompt` to (1, 77, C) hidden states of `model.text_encoder` (SD's conditioning).

    A prompt longer than the encoder's 77 tokens (start and end tokens included) is refused
    with `overflow="error"` (the default: a silently shortened prompt is a different
    experiment), or cut to 77 tokens with a logged warning with `overflow="truncate"`.
    """
    check_choice("prompt_overflow", overflow, OVERFLOW_POLICIES)
    tok = model.tokenizer
    limit = tok.model_max_length
    n_tokens = len(tok(prompt).input_ids)
    if n_tokens > limit:
        msg = f"prompt has {n_tokens} tokens, more than the text encoder's {limit}"
        if overflow == "error":
            raise PromptError(f"{msg}: shorten it, or set prompt_overflow=truncate to cut it to {limit}")
        log.warning("%s; truncating to %d tokens: %r", msg, limit, prompt)
    ids = tok(prompt, padding="max_length", max_length=limit, truncation=True, return_tensors="pt").input_ids
    return model.text_encoder(ids.to(model.device))[0].to(model.dtype)
