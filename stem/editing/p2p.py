"""Prompt-to-prompt cross-attention edits (Hertz et al. 2023) used by FateZero's fusion.

Cross-attention maps A have the text tokens on their last axis: A[..., s] is the attention of
each query to token s of the (77-token, BOS first) prompt. From the source prompt's maps A_src
(recorded during inversion) and the edit's own maps A_edit:

- Replace (same number of words): A = A_src M, with M (L x L) mapping source tokens to target
  tokens: identity for BOS, unchanged words and the end/padding tail; for a replaced word
  with a source tokens and b target tokens, M[s, t] = 1/a (each target token takes the mean
  of the source word's maps); an unchanged word maps token to token.
- Refine (any prompts): prompt-to-prompt's global alignment of the two token sequences (the
  tokenizer's ids, BOS and EOS included; match +1, mismatch -1, gap 0; tracing back from the
  ends, a tie leaves the target token unpaired first, then skips a source token, then pairs
  them). Tokens, not words, so "head" and "head," share the token of "head". A paired target
  token takes the map of its source token (`mapper`, `alphas` = 1); an unpaired one (a new or
  changed token) keeps the edit's own map (`alphas` = 0); positions after the target's EOS map to
  the same position of the source, as released:
  A = A_src[..., mapper] * alphas + A_edit * (1 - alphas).
- Reweight: A[..., t] *= scale for the tokens t of the chosen target words (e.g. x10).

Word boundaries (Replace, Reweight, blend words) come from the tokenizer itself
(`tokenizer.tokenize(word)` per word), so the same code works for CLIP's BPE and the tiny
character-level tokenizer of the tests.
"""

from __future__ import annotations

import torch

from stem.errors import ConfigError

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


def _tail(src_end: int, tgt_end: int, length: int) -> list[tuple[int, int]]:
    """(source, target) positions of the end token and padding after the last word."""
    return [(min(src_end + k, length - 1), t) for k, t in enumerate(range(tgt_end, length))]


def replace_mapper(tokenizer, source: str, target: str, length: int = 77) -> torch.Tensor:
    """M (length x length) with A_target = A_src @ M; the prompts must have the same number of words."""
    src_words, src_spans = word_spans(tokenizer, source, length)
    tgt_words, tgt_spans = word_spans(tokenizer, target, length)
    if len(src_words) != len(tgt_words):
        raise ConfigError(f"prompt-to-prompt replace needs the same number of words: '{source}' has "
                          f"{len(src_words)}, '{target}' has {len(tgt_words)}; use editing.cross_edit=refine")
    mapper = torch.zeros(length, length, dtype=torch.float64)
    mapper[0, 0] = 1.0
    for sw, tw, s, t in zip(src_words, tgt_words, src_spans, tgt_spans):
        if sw.lower() == tw.lower():  # an unchanged word: token to token
            mapper[list(s), list(t)] = 1.0
        else:
            mapper[s.start:s.stop, t.start:t.stop] = 1.0 / len(s)
    for s, t in _tail(src_spans[-1].stop if src_spans else 1, tgt_spans[-1].stop if tgt_spans else 1, length):
        mapper[s, t] = 1.0
    return mapper


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
