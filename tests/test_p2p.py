"""Prompt-to-prompt mappers (FateZero's cross-attention fusion): alignments written out by hand."""

import pytest
import torch

from stem.editing.p2p import align_words, refine_mapper, replace_mapper, reweight_equalizer, word_tokens
from stem.errors import ConfigError
from stem.models import tiny_tokenizer

JEEP = "a silver jeep driving down a road"
PORSCHE = "a Porsche car driving down a road"
STYLE = "watercolor painting of a silver jeep driving down a road"


class WordTokenizer:
    """One token per word: the token positions are the word positions (BOS = 0)."""

    def tokenize(self, text):
        return text.split()


def test_word_alignment_pairs_shared_words_only():
    assert align_words(JEEP.split(), PORSCHE.split()) == [0, None, None, 3, 4, 5, 6]
    assert align_words(JEEP.split(), STYLE.split()) == [None, None, None, 0, 1, 2, 3, 4, 5, 6]
    assert align_words("a cat".split(), "a cat".split()) == [0, 1]
    assert align_words("a cat".split(), "A CAT".split()) == [0, 1]  # case-insensitive
    assert align_words("a red car".split(), "a car".split()) == [0, 2]  # a deleted word


def test_refine_mapper_for_a_word_swap():
    mapper, alphas = refine_mapper(WordTokenizer(), JEEP, PORSCHE)
    assert mapper[:9].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert alphas[:9].tolist() == [1, 1, 0, 0, 1, 1, 1, 1, 1]  # "Porsche", "car" keep the edit's maps
    assert (alphas[9:] == 1).all() and mapper[9:].tolist() == list(range(9, 77))


def test_refine_mapper_for_a_style_prefix():
    mapper, alphas = refine_mapper(WordTokenizer(), JEEP, STYLE)
    #           BOS watercolor painting of  a  silver jeep driving down a  road  EOS ...
    assert mapper[:12].tolist() == [0, 1, 2, 3, 1, 2, 3, 4, 5, 6, 7, 8]
    assert alphas[:12].tolist() == [1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    assert mapper[12:15].tolist() == [9, 10, 11] and mapper[-1].item() == 73  # EOS and padding, shifted by 3
    mapper, alphas = refine_mapper(WordTokenizer(), JEEP, "a jeep")  # shorter target: the tail clips at 76
    assert mapper[:4].tolist() == [0, 1, 3, 8] and alphas[:4].tolist() == [1, 1, 1, 1]
    assert mapper[-1].item() == 76 and (alphas[3:] == 1).all()


def test_replace_mapper_with_multi_token_words():
    tok = tiny_tokenizer()  # character level: "silver" is 6 tokens, "porsche" 7, "jeep" 4, "car" 3
    m = replace_mapper(tok, JEEP, PORSCHE)
    expected = torch.zeros(77, 77, dtype=torch.float64)
    expected[0, 0] = 1                      # BOS
    expected[1, 1] = 1                      # "a"
    expected[2:8, 2:9] = 1 / 6              # silver (source 2..7) -> porsche (target 2..8)
    expected[8:12, 9:12] = 1 / 4            # jeep (source 8..11) -> car (target 9..11)
    src_rest, tgt_rest = range(12, 28), range(12, 28)  # "driving down a road" is 16 tokens in both
    for s, t in zip(src_rest, tgt_rest):
        expected[s, t] = 1
    for k, t in enumerate(range(28, 77)):  # EOS and padding
        expected[min(28 + k, 76), t] = 1
    assert torch.equal(m, expected)
    attn = torch.rand(2, 5, 77, dtype=torch.float64)
    mapped = attn @ m
    assert torch.allclose(mapped[..., 2], attn[..., 2:8].mean(-1))  # a target token of porsche: mean of silver


def test_identical_prompts_map_to_themselves():
    for tok in (WordTokenizer(), tiny_tokenizer()):
        assert torch.equal(replace_mapper(tok, JEEP, JEEP), torch.eye(77, dtype=torch.float64))
        mapper, alphas = refine_mapper(tok, JEEP, JEEP)
        assert torch.equal(mapper, torch.arange(77)) and (alphas == 1).all()


def test_reweight_and_word_tokens():
    scale = reweight_equalizer(WordTokenizer(), STYLE, {"watercolor": 10})
    assert scale[1].item() == 10 and (scale[2:] == 1).all() and scale[0].item() == 1
    assert word_tokens(WordTokenizer(), JEEP, ["jeep", "road"]) == [3, 7]
    assert word_tokens(tiny_tokenizer(), JEEP, ["jeep"]) == [8, 9, 10, 11]


def test_bad_prompts_are_config_errors():
    with pytest.raises(ConfigError, match="same number of words.*use editing.cross_edit=refine"):
        replace_mapper(WordTokenizer(), JEEP, STYLE)
    with pytest.raises(ConfigError, match="'fox' is not a word of the target prompt"):
        reweight_equalizer(WordTokenizer(), JEEP, {"fox": 2})
    with pytest.raises(ConfigError, match=r"blend_words: \['fox'\]"):
        word_tokens(WordTokenizer(), JEEP, ["fox"])
