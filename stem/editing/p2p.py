"""Prompt-to-prompt cross-attention edits (Hertz et al. 2023) used by FateZero's fusion.

Cross-attention maps A have the text tokens on their last axis: A[..., s] is the attention of
each query to token s of the (77-token, BOS first) prompt. From the source prompt's maps A_src
(recorded during inversion) and the edit's own maps A_edit:

- Replace (same number of words): A = A_src M, with M (L x L) mapping source tokens to target
  tokens, as prompt-to-prompt's `get_replacement_mapper_` (FateZero's copy is the same), quirks
  included: walking both prompts from BOS, tokens before the last changed word map token to token;
  a changed word whose source and target have the same number of tokens maps token to token too
  (mallard -> Vermeer, 2 tokens each: the diagonal, not the mean); one with a source tokens and b != a
  target tokens gets M[s, t] = 1/b (each target token takes the SUM of the source word's maps divided by
  the number of TARGET tokens, not their mean); after the last changed word, target token t takes source
  token t (same position, not the token it follows from: with a != b the rest of the prompt is shifted),
  and when the source has n more tokens in all, the last n target positions get no source token at all
  (zero columns). Words are compared case-sensitively after splitting on single spaces.
- Refine (any prompts): prompt-to-prompt's global alignment of the two token sequences (the
  tokenizer's ids, BOS and EOS included; match +1, mismatch -1, gap 0; tracing back from the
  ends, a tie leaves the target token unpaired first, then skips a source token, then pairs
  them). Tokens, not words, so "head" and "head," share the token of "head". A paired target
  token takes the map of its source token (`mapper`, `alphas` = 1); an unpaired one (a new or
  changed token) keeps the edit's own map (`alphas` = 0); positions after the target's EOS map to
  the same position of the source, as released:
  A = A_src[..., mapper] * alphas + A_edit * (1 - alphas).
- Reweight: A[..., t] *= scale for the tokens t of the chosen target words (e.g. x10), on the map
  after the Replace/Refine mapping (the released reweight controller wraps the mapping one).
- Which mapping (`cross_edit_kind`): FateZero's release uses Replace when the prompts have the same
  number of space-separated words (its `is_replace_controller`, on by default), Refine otherwise.

Word boundaries (Replace, Reweight, blend words) come from the tokenizer itself
(`tokenizer.tokenize(word)` per word), so the same code works for CLIP's BPE and the tiny
character-level tokenizer of the tests.
"""

from __future__ import annotations

import torch

from stem.core.errors import ConfigError

MATCH, MISMATCH, GAP = 1, -1, 0  # prompt-to-prompt's refinement scores


def word_spans(tokenizer, prompt: str, length: int = 77) -> tuple[list[str], list[range]]:
    """The words of `prompt` and the token positions of each (BOS is position 0)."""
    words, spans, pos = prompt.split(), [], 1
    for word in words:
        n = len(tokenizer.tokenize(word))
        spans.append(range(pos, pos + n))
        pos += n
    if pos >= length:
        raise ConfigError(f"prompt '{prompt[:40]}...' has {pos - 1} tokens; at most {length - 2} fit")
    return words, spans


def prompt_ids(tokenizer, prompt: str, length: int = 77) -> list[int]:
    """Token ids of `prompt`, BOS first and EOS last, at most `length` (a longer prompt keeps its EOS)."""
    ids = list(tokenizer.encode(prompt))
    return ids if len(ids) <= length else ids[:length - 1] + ids[-1:]


def align_tokens(source: list, target: list) -> list[int | None]:
    """For each target token, the position of the source token it is paired with, or None
    (global alignment, module docstring)."""
    n, m = len(source), len(target)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        score[i][0] = i * GAP
    for j in range(m + 1):
        score[0][j] = j * GAP
    pair = lambda i, j: MATCH if source[i] == target[j] else MISMATCH  # noqa: E731
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            score[i][j] = max(score[i][j - 1] + GAP, score[i - 1][j] + GAP, score[i - 1][j - 1] + pair(i - 1, j - 1))
    out: list[int | None] = [None] * m
    i, j = n, m
    while i > 0 or j > 0:  # trace back: target unpaired, then source skipped, then the pair
        if j > 0 and score[i][j] == score[i][j - 1] + GAP:
            j -= 1
        elif i > 0 and (j == 0 or score[i][j] == score[i - 1][j] + GAP):
            i -= 1
        else:
            i, j = i - 1, j - 1
            out[j] = i
    return out


def replace_mapper(tokenizer, source: str, target: str, length: int = 77) -> torch.Tensor:
    """M (length x length) with A_target = A_src @ M, as prompt-to-prompt's replacement mapper (module
    docstring); the prompts must have the same number of words."""
    src_words, tgt_words = source.split(" "), target.split(" ")  # as released: single spaces, case kept
    if src_words != source.split() or tgt_words != target.split():
        raise ConfigError(f"prompt-to-prompt replace splits words on single spaces: '{source}' / '{target}'")
    if len(src_words) != len(tgt_words):
        raise ConfigError(f"prompt-to-prompt replace needs the same number of words: '{source}' has "
                          f"{len(src_words)}, '{target}' has {len(tgt_words)}; use editing.cross_edit=refine")
    _, src_spans = word_spans(tokenizer, source, length)
    _, tgt_spans = word_spans(tokenizer, target, length)
    changed = [k for k, (sw, tw) in enumerate(zip(src_words, tgt_words)) if sw != tw]
    mapper = torch.zeros(length, length, dtype=torch.float64)
    i = j = 0  # source and target positions, walked together from BOS
    for k in changed:
        s, t = src_spans[k], tgt_spans[k]
        for d in range(s.start - i):  # BOS and unchanged words up to the changed one: token to token
            mapper[i + d, j + d] = 1.0
        if len(s) == len(t):  # quirk: token to token, not the mean over the source word
            mapper[list(s), list(t)] = 1.0
        else:  # quirk: 1 / (number of TARGET tokens), so each target token gets sum(source maps) / b
            mapper[s.start:s.stop, t.start:t.stop] = 1.0 / len(t)
        i, j = s.stop, t.stop
    # quirk: after the last changed word, target token t takes source token t (positions, not tokens); the
    # walk stops when either side reaches `length`, so a source longer by n leaves the last n columns empty
    for t in range(j, length - max(0, i - j)):
        mapper[t, t] = 1.0
    return mapper


def cross_edit_kind(source: str, target: str, choice: str = "auto") -> str:
    """"replace" or "refine": `choice` itself, or for "auto" FateZero's release rule (module docstring)."""
    if choice != "auto":
        return choice
    return "replace" if len(source.split(" ")) == len(target.split(" ")) else "refine"


def refine_mapper(tokenizer, source: str, target: str, length: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    """(mapper, alphas), both (length,): A = A_src[..., mapper] * alphas + A_edit * (1 - alphas)."""
    src, tgt = prompt_ids(tokenizer, source, length), prompt_ids(tokenizer, target, length)
    mapper = torch.arange(length)
    alphas = torch.ones(length, dtype=torch.float64)  # after the target's EOS: the same position, as released
    for j, i in enumerate(align_tokens(src, tgt)):
        if i is None:
            alphas[j] = 0.0
        else:
            mapper[j] = i
    return mapper, alphas


def reweight_equalizer(tokenizer, prompt: str, words: dict[str, float], length: int = 77) -> torch.Tensor:
    """(length,) scales: `words[w]` on the tokens of every occurrence of word w in `prompt`, 1 elsewhere."""
    prompt_words, spans = word_spans(tokenizer, prompt, length)
    scale = torch.ones(length, dtype=torch.float64)
    lowered = [w.lower() for w in prompt_words]
    for word, factor in words.items():
        if word.lower() not in lowered:
            raise ConfigError(f"editing.reweight: '{word}' is not a word of the target prompt '{prompt}'")
        for w, span in zip(lowered, spans):
            if w == word.lower():
                scale[span.start:span.stop] = float(factor)
    return scale


def word_tokens(tokenizer, prompt: str, words, length: int = 77) -> list[int]:
    """Token positions of the given words in `prompt` (for blend masks)."""
    prompt_words, spans = word_spans(tokenizer, prompt, length)
    lowered = [w.lower() for w in prompt_words]
    missing = [w for w in words if w.lower() not in lowered]
    if missing:
        raise ConfigError(f"editing.blend_words: {missing} are not words of the prompt '{prompt}'")
    return [p for w, span in zip(lowered, spans) if w in {x.lower() for x in words} for p in span]
