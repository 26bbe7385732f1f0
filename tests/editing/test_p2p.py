"""Prompt-to-prompt mappers (FateZero's cross-attention fusion): alignments written out by hand."""

import re

import pytest
import torch

from stem.core.errors import ConfigError
from stem.diffusion.models import tiny_tokenizer
from stem.editing import FateZeroEditor
from stem.editing.p2p import align_tokens, refine_mapper, replace_mapper, reweight_equalizer, word_tokens

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


def release_replacement_mapper(tok, x: str, y: str, length: int = 77) -> torch.Tensor:
    """prompt-to-prompt's `get_replacement_mapper_` (seq_aligner.py; FateZero's copy is the same), written
    out: two cursors i (source) and j (target) walk from BOS; at a changed word (words compared as
    written, split on spaces) its source rows x target columns get 1 on the diagonal for equal token counts,
    else 1 / (target tokens) everywhere, and both cursors jump past the word; before the last changed
    word a token maps to the token it walks with; after it, to the same position (mapper[j, j]); the walk
    ends when either cursor reaches `length`."""
    wx, wy = x.split(" "), y.split(" ")

    def inds(words, k):  # token positions of word k (BOS is 0)
        start = 1 + sum(len(tok.tokenize(w)) for w in words[:k])
        return list(range(start, start + len(tok.tokenize(words[k]))))

    changed = [k for k in range(len(wy)) if wy[k] != wx[k]]
    src, tgt = [inds(wx, k) for k in changed], [inds(wy, k) for k in changed]
    m = torch.zeros(length, length, dtype=torch.float64)
    i = j = cur = 0
    while i < length and j < length:
        if cur < len(src) and src[cur][0] == i:
            if len(src[cur]) == len(tgt[cur]):
                for a, b in zip(src[cur], tgt[cur]):
                    m[a, b] = 1
            else:
                for b in tgt[cur]:
                    for a in src[cur]:
                        m[a, b] = 1 / len(tgt[cur])
            i, j, cur = i + len(src[cur]), j + len(tgt[cur]), cur + 1
        elif cur < len(src):
            m[i, j] = 1
            i, j = i + 1, j + 1
        else:
            m[j, j] = 1
            i, j = i + 1, j + 1
    return m


# CLIP-like splits written out (one token per piece): 1, 2 and 3 tokens for the swapped words
SWAP_PIECES = {"mallard": ["mall", "ard"], "vermeer": ["ver", "meer"], "flamingo": ["fla", "min", "go"]}
SWAPS = {  # source -> target, same number of words; (source tokens -> target tokens) of the changed words
    "1->2": ("a cat on a mat", "a mallard on a mat"),
    "1->3": ("a cat on a mat", "a flamingo on a mat"),
    "2->1": ("a mallard on a mat", "a cat on a mat"),
    "2->2": ("a mallard on a mat", "a Vermeer on a mat"),
    "2->1, 1->3": ("a mallard on a cat", "a dog on a flamingo"),
    "case": ("A cat on a mat", "a cat on a mat"),
    "2->1, case": ("a mallard on a Mat", "a cat on a mat"),  # "Mat" vs "mat" is a changed word, as released
}


@pytest.mark.parametrize("name", sorted(SWAPS))
def test_replace_mapper_equals_prompt_to_prompt(name):
    """Against the written-out release mapper. Catches: the mean over source tokens (1/a instead of 1/b),
    averaging an equal-length multi-token swap (2->2), mapping the words after a changed one by token
    instead of by position, filling the columns the release leaves empty (2->1), and words compared
    lower-cased (then "on" after a 2->1 swap would map by position, not to "on")."""
    tok = WordTokenizer(SWAP_PIECES)
    source, target = SWAPS[name]
    assert torch.equal(replace_mapper(tok, source, target), release_replacement_mapper(tok, source, target))


def test_replace_mapper_quirks_by_hand():
    """The release's quirks, entry by entry (BOS a ... ; the changed word starts at position 2)."""
    tok = WordTokenizer(SWAP_PIECES)
    m = replace_mapper(tok, *SWAPS["2->2"])  # mallard -> Vermeer: token to token, not 0.5 / 0.5
    assert m[2:4, 2:4].tolist() == [[1, 0], [0, 1]]
    m = replace_mapper(tok, *SWAPS["1->2"])  # cat -> mall ard: each gets cat / 2 (1 / target tokens)
    assert m[2, 2].item() == m[2, 3].item() == 0.5 and m[:, 2].sum().item() == 0.5
    assert m[4, 4].item() == 1 and m[3, 4].item() == 0  # "on" (target 4) takes source 4 ("a"), not "on" (3)
    m = replace_mapper(tok, *SWAPS["1->3"])
    assert m[2, 2:5].tolist() == [1 / 3] * 3
    m = replace_mapper(tok, *SWAPS["2->1"])  # mall ard -> cat: cat gets mall + ard (1 / 1)
    assert m[2:4, 2].tolist() == [1, 1] and (m[:, 76] == 0).all() and m[75, 75].item() == 1
    m = replace_mapper(tok, *SWAPS["case"])  # "A" vs "a": changed as written, same token, token to token
    assert torch.equal(m, torch.eye(77, dtype=torch.float64))


def test_replace_mapper_with_multi_token_words():
    """The character-level tiny tokenizer: silver (6 tokens) -> porsche (7), jeep (4) -> car (3)."""
    tok = tiny_tokenizer()
    m = replace_mapper(tok, JEEP, PORSCHE)
    assert torch.equal(m, release_replacement_mapper(tok, JEEP, PORSCHE))
    assert (m[2:8, 2:9] == 1 / 7).all() and (m[8:12, 9:12] == 1 / 3).all()
    attn = torch.rand(2, 5, 77, dtype=torch.float64)
    mapped = attn @ m
    assert torch.allclose(mapped[..., 2], attn[..., 2:8].sum(-1) / 7)  # a porsche token: silver's sum / 7


def fused(editor, tok, source, target, src, own):
    return editor._cross_edit(tok, source, target)(src, own)


@pytest.mark.parametrize("name", ["wolf", "woman_running", "car_turn"])
def test_cross_edit_auto_follows_the_fatezero_release(name):
    """FateZero's release picks Replace when the prompts have the same number of words, else Refine.
    Catches Refine for wolf -> fox / woman-running (fox and Wonder would keep the edit's own map) and
    Replace tried on car-turn's prefix."""
    tok = WordTokenizer(CLIP_PIECES)
    source, target = TABLE2[name]
    src, own = torch.rand(2, 3, 77, dtype=torch.float64), torch.rand(2, 3, 77, dtype=torch.float64)
    out = fused(FateZeroEditor(prompt=target), tok, source, target, src, own)  # the default is "auto"
    if len(source.split()) == len(target.split()):
        assert torch.equal(out, src @ release_replacement_mapper(tok, source, target))
        assert torch.equal(out[..., 1 if name == "woman_running" else 2], src[..., 1 if name == "woman_running" else 2])
    else:
        index, alphas = refine_mapper(tok, source, target)
        assert torch.equal(out, src[..., index] * alphas + own * (1 - alphas))
    forced = fused(FateZeroEditor(prompt=target, cross_edit="refine"), tok, source, target, src, own)
    index, alphas = refine_mapper(tok, source, target)
    assert torch.equal(forced, src[..., index] * alphas + own * (1 - alphas))


def test_reweight_scales_the_mapped_map():
    """The release's reweight controller scales the map its Refine/Replace controller returns. Catches the
    scale applied to the source map before the mapping: "watercolor" (new, unpaired) keeps the edit's own
    map, which must be scaled x10 too."""
    tok = WordTokenizer()
    source, target = JEEP, STYLE
    src, own = torch.rand(2, 3, 77, dtype=torch.float64), torch.rand(2, 3, 77, dtype=torch.float64)
    out = fused(FateZeroEditor(prompt=target, reweight={"watercolor": 10}), tok, source, target, src, own)
    index, alphas = refine_mapper(tok, source, target)
    expected = src[..., index] * alphas + own * (1 - alphas)
    expected[..., 1] *= 10  # "watercolor" is target token 1
    assert torch.equal(out, expected)


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
