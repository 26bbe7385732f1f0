"""Prompt encoding (stem.diffusion.prompts): the 77-token limit and its overflow policies."""

import logging
from pathlib import Path

import pytest
import torch

from stem.core.errors import ConfigError, PromptError
from stem.diffusion.prompts import encode_prompt

ROOT = Path(__file__).resolve().parents[2]
LONG = ("a woman in a red dress is running along a sandy beach at sunset, waves breaking, seagulls "
        "flying overhead, golden light, cinematic, highly detailed")


def _ids(model, prompt: str) -> list[int]:
    return model.tokenizer(prompt).input_ids  # start + tokens + end, no padding or truncation


def _encode_ids(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.text_encoder(torch.tensor([ids]))[0]


def test_long_prompt_is_refused_with_the_token_count_and_the_fix(tiny_model):
    n = len(_ids(tiny_model, LONG))
    assert n > 77  # the tiny tokenizer has one token per character
    with pytest.raises(PromptError) as info:
        encode_prompt(tiny_model, LONG)
    msg = str(info.value)
    assert f"{n} tokens" in msg and "77" in msg
    assert "shorten" in msg and "prompt_overflow=truncate" in msg
    assert "\n" not in msg


def test_the_fix_named_in_the_error_is_a_valid_override(tiny_model):
    from hydra import compose, initialize_config_dir

    with pytest.raises(PromptError) as info:
        encode_prompt(tiny_model, LONG)
    override = next(w for w in str(info.value).split() if w.endswith("prompt_overflow=truncate"))
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[override])
    assert cfg.prompt_overflow == "truncate"


def test_truncate_gives_the_first_77_tokens_and_warns(tiny_model, caplog):
    tok = tiny_model.tokenizer
    ids = _ids(tiny_model, LONG)
    # What SD's pipeline feeds the encoder: start token, the first 75 prompt tokens, end token.
    truncated = ids[:76] + [tok.eos_token_id]
    assert len(truncated) == 77 and ids[-1] == tok.eos_token_id and ids[76] != tok.eos_token_id
    with caplog.at_level(logging.WARNING, logger="stem.diffusion.prompts"):
        out = encode_prompt(tiny_model, LONG, overflow="truncate")
    assert out.shape == (1, 77, 32)
    torch.testing.assert_close(out, _encode_ids(tiny_model, truncated), rtol=0, atol=0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "stem.diffusion.prompts"]
    assert len(warnings) == 1 and f"{len(ids)} tokens" in warnings[0].getMessage()
    # The last 77-token window would give other states: the prompt's start really is what is kept.
    assert not torch.allclose(out, _encode_ids(tiny_model, [ids[0]] + ids[-76:]))


def test_exactly_77_tokens_passes_and_78_is_refused(tiny_model, caplog):
    word = "a" * 75  # one word of 75 characters: 75 tokens plus start and end
    assert len(_ids(tiny_model, word)) == 77 and len(_ids(tiny_model, word + "a")) == 78
    with caplog.at_level(logging.WARNING, logger="stem.diffusion.prompts"):
        out = encode_prompt(tiny_model, word)
    assert out.shape == (1, 77, 32) and not [r for r in caplog.records if r.name == "stem.diffusion.prompts"]
    torch.testing.assert_close(out, _encode_ids(tiny_model, _ids(tiny_model, word)), rtol=0, atol=0)
    with pytest.raises(PromptError, match="78 tokens"):
        encode_prompt(tiny_model, word + "a")


def test_unknown_overflow_policy_raises_config_error(tiny_model):
    with pytest.raises(ConfigError, match="'cut'.*error, truncate"):
        encode_prompt(tiny_model, "a cat", overflow="cut")
    with pytest.raises(ConfigError):
        encode_prompt(tiny_model, LONG, overflow="ignore")  # checked before the length


def test_short_prompt_is_padded_to_77_and_differs_from_another(tiny_model):
    tok = tiny_model.tokenizer
    a = encode_prompt(tiny_model, "a woman is running")
    assert a.shape == (1, 77, 32) and a.dtype == torch.float32
    ids = _ids(tiny_model, "a woman is running")
    padded = ids + [tok.pad_token_id] * (77 - len(ids))
    torch.testing.assert_close(a, _encode_ids(tiny_model, padded), rtol=0, atol=0)
    b = encode_prompt(tiny_model, "a man is walking")
    assert not torch.allclose(a, b)
    assert torch.equal(encode_prompt(tiny_model, "a woman is running"), a)
