"""Prompt-to-prompt mappers (FateZero's cross-attention fusion): alignments written out by hand."""

import re

import pytest
import torch

from stem.editing.p2p import align_tokens, refine_mapper, replace_mapper, reweight_equalizer, word_tokens
from stem.errors import ConfigError
from stem.models import tiny_tokenizer

JEEP = "a silver jeep driving down a road"
PORSCHE = "a Porsche car driving down a road"
STYLE = "watercolor painting of a silver jeep driving down a road"


class WordTokenizer:
    """CLIP's pre-tokenisation (lower case; words and punctuation marks are separate pieces), one token per
    piece unless `pieces` splits a word (CLIP's BPE splits, written out), BOS 49406 / EOS 49407 as CLIP's."""

    def __init__(self, pieces: dict | None = None):
        self.pieces, self.vocab = pieces or {}, {}

    def tokenize(self, text):
        return [p for w in re.findall(r"[\w']+|[^\w\s]", text.lower()) for p in self.pieces.get(w, [w])]

    def encode(self, text):
        return [49406, *(self.vocab.setdefault(p, len(self.vocab)) for p in self.tokenize(text)), 49407]


# CLIP ViT-L/14's BPE on the Table 2 prompts (checked once against the real tokenizer): one token per word
# and per comma, except these words.
CLIP_PIECES = {"tilted": ["til", "ted"], "miyazaki": ["mi", "yaz", "aki"], "hayao": ["hay", "ao"]}
TABLE2 = {  # configs/data/*.yaml `prompt` -> `edit_prompt`, and the released car-turn prompt with its comma
    "car_turn": ("a silver jeep driving down a curvy road in the countryside",
                 "watercolor painting of a silver jeep driving down a curvy road in the countryside"),
    "taylor": ("A beautiful girl tilted her head", "A beautiful girl tilted her head, Miyazaki Hayao style"),
    "wolf": ("a wolf", "a fox"),
    "woman_running": ("A woman is running", "Wonder woman is running"),
    "car_turn_released": ("a silver jeep driving down a curvy road in the countryside,",
                          "watercolor painting of a silver jeep driving down a curvy road in the countryside"),
}
# For each target token (BOS first, EOS last), the source token it is paired with (None: keeps A_edit).
TABLE2_ALIGNMENT = {
    #             BOS watercolor painting of  a silver jeep driving down a curvy road in the countryside EOS
    "car_turn": [0, None, None, None, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
    #           BOS a beautiful girl til ted her head  ,    mi   yaz  aki  hay  ao  style EOS
    "taylor": [0, 1, 2, 3, 4, 5, 6, 7, None, None, None, None, None, None, None, 8],
    "wolf": [0, 1, None, 3],                    # BOS a fox EOS
    "woman_running": [0, None, 2, 3, 4, 5],     # BOS wonder woman is running EOS
    # source: BOS a silver ... countryside(11) ,(12) EOS(13); the target has no comma
    "car_turn_released": [0, None, None, None, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13],
}


@pytest.mark.parametrize("name", sorted(TABLE2))
def test_token_alignment_of_the_table2_prompts(name):
    """Catches a word-level alignment ("head" vs "head," or "countryside," unpaired) and any other pairing."""
    tok = WordTokenizer(CLIP_PIECES)
    source, target = TABLE2[name]
    expected = TABLE2_ALIGNMENT[name]
    assert align_tokens(tok.encode(source), tok.encode(target)) == expected
    mapper, alphas = refine_mapper(tok, source, target)
    m = len(expected)
    assert alphas[:m].tolist() == [0.0 if i is None else 1.0 for i in expected]
    assert [int(mapper[j]) for j, i in enumerate(expected) if i is not None] == [i for i in expected if i is not None]
    assert (alphas[m:] == 1).all() and mapper[m:].tolist() == list(range(m, 77))  # after EOS: same position


def test_token_alignment_ties_follow_prompt_to_prompt():
    """Equal-score alignments: tracing back from the end, a target token is left unpaired before a source
    token is skipped (catches a diagonal-first or source-first tie-break)."""
    tok = WordTokenizer()
    a = lambda s, t: align_tokens(tok.encode(s), tok.encode(t))  # noqa: E731
    assert a("a cat and a dog", "a dog") == [0, 1, 5, 6]   # "a" pairs with the first "a"
    assert a("a b a b", "b a") == [0, 2, 3, 5]
    assert a("a b", "b a") == [0, 2, None, 3]  # source-first would pair "a" instead of "b"
    assert a("x a a", "a") == [0, 2, 4]  # the first "a": diagonal-first would pair the last
    assert a("a cat", "A CAT") == [0, 1, 2, 3]  # lower-cased by the tokenizer
    assert a("a red car", "a car") == [0, 1, 3, 4]  # a deleted word


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
    assert mapper[12:15].tolist() == [12, 13, 14] and mapper[-1].item() == 76  # padding: the same position
    mapper, alphas = refine_mapper(WordTokenizer(), JEEP, "a jeep")  # shorter target
    assert mapper[:4].tolist() == [0, 1, 3, 8] and alphas[:4].tolist() == [1, 1, 1, 1]
    assert mapper[4:].tolist() == list(range(4, 77)) and (alphas[3:] == 1).all()


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
