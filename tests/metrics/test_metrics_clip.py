"""CLIP score / frame consistency (stem.metrics.clip_score) against explicit formulas (spec/METRICS.md).

No weights offline: a randomly initialised ViT-B-32-quickgelu (built explicitly, seed 0) on CPU.
"""

import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.data import astronaut

from stem.core.errors import ConfigError, StemError
from stem.metrics import clip_score as cs
from stem.metrics.clip_score import ClipScorer, ClipWeightsError

# OpenAI CLIP preprocessing constants (CLIP repo, clip/clip.py `_transform`).
OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def _photo_frames(n: int = 3, h: int = 96, w: int = 128) -> torch.Tensor:
    """(n, 3, h, w) float32 crops of a real photograph in [0, 1], non-square, all different."""
    image = torch.from_numpy(astronaut()).permute(2, 0, 1).float() / 255
    return torch.stack([image[:, 60 * i:60 * i + h, 80 * i + 100:80 * i + 100 + w] for i in range(n)])


def _reference_preprocess(x: torch.Tensor) -> torch.Tensor:
    """Independent CLIP eval preprocessing: shortest side -> 224 (bicubic, antialiased), centre
    crop 224, clamp to [0, 1] (as PIL's uint8 would), normalise with OpenAI mean/std."""
    h, w = x.shape[-2:]
    size = (224, int(224 * w / h)) if h <= w else (int(224 * h / w), 224)
    x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = int(round((x.shape[-2] - 224) / 2.0)), int(round((x.shape[-1] - 224) / 2.0))
    x = x[..., top:top + 224, left:left + 224]
    return (x - OPENAI_MEAN) / OPENAI_STD


@pytest.fixture(scope="module")
def scorer() -> ClipScorer:
    return ClipScorer(pretrained=None, device="cpu", batch_size=2, seed=0)


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    return _photo_frames()


@pytest.fixture(scope="module")
def result(scorer, frames) -> dict:
    return scorer.score(frames, "an astronaut in a white suit")


@pytest.fixture(scope="module")
def two_images(scorer, frames) -> torch.Tensor:
    return scorer.image_embeddings(frames[:2])


@pytest.fixture(scope="module")
def cat_text(scorer) -> torch.Tensor:
    return scorer.text_embedding("a cat")


def test_import_does_not_load_open_clip():
    code = "import sys, stem.metrics.clip_score; assert 'open_clip' not in sys.modules, 'eager import'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-500:]


def test_embedding_shapes_and_unit_norm(scorer, two_images, cat_text):
    images, one = two_images, cat_text
    texts = scorer.text_embeddings(["a cat", "a dog on the beach"])
    assert images.shape == (2, 512) and texts.shape == (2, 512) and one.shape == (512,)
    assert images.dtype == texts.dtype == torch.float64
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(one, texts[0], rtol=0, atol=1e-6)
    assert (texts[0] - texts[1]).abs().max() > 1e-3  # different prompts, different embeddings


def test_score_equals_cosine_of_raw_encoder_outputs(scorer, frames, result):
    import open_clip

    with torch.no_grad():
        img = scorer.model.encode_image(_reference_preprocess(frames)).double()
        txt = scorer.model.encode_text(open_clip.tokenize(["an astronaut in a white suit"])).double()[0]
    assert img.norm(dim=-1).sub(1).abs().min() > 1e-3  # raw outputs really are unnormalised
    expected = (img @ txt) / (img.norm(dim=-1) * txt.norm())
    got = torch.tensor(result["per_frame"], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert all(-1 <= c <= 1 for c in result["per_frame"])
    assert result["clip_score"] == pytest.approx(float(np.mean(result["per_frame"])), abs=1e-12)
    pairs = [float(img[i] @ img[i + 1] / (img[i].norm() * img[i + 1].norm())) for i in range(2)]
    np.testing.assert_allclose(result["consistency_per_pair"], pairs, rtol=0, atol=1e-6)
    assert result["frame_consistency"] == pytest.approx(np.mean(pairs), abs=1e-6)


def test_tensor_preprocessing_matches_open_clip_pil_transform(scorer):
    # The PIL path (what open_clip users feed) differs only by uint8 rounding and resampler detail.
    from PIL import Image

    image = astronaut()[:300, 20:380]
    ours = scorer._transform(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)
    pil = scorer.preprocess(Image.fromarray(image))[None]
    assert ours.shape == pil.shape == (1, 3, 224, 224)
    diff = (ours - pil).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.1, (diff.mean(), diff.max())


def test_batched_score_equals_loop_over_frames(scorer, frames, result):
    assert scorer.batch_size == 2 and len(frames) == 3  # a full batch and a partial one
    text = scorer.text_embedding("an astronaut in a white suit")
    single = scorer.score(frames[2:], "an astronaut in a white suit")
    assert single["frame_consistency"] is None and single["consistency_per_pair"] == []
    loop = [float(scorer.image_embeddings(frames[i:i + 1])[0] @ text) for i in range(2)] + single["per_frame"]
    np.testing.assert_allclose(result["per_frame"], loop, rtol=0, atol=1e-5)


def test_frame_consistency_is_one_for_static_video_and_lower_otherwise(scorer, frames, result):
    static = scorer.score(frames[:1].expand(3, -1, -1, -1), "an astronaut in a white suit")
    # batch_size=2: frames 0-1 go through the float32 encoder as a batch of 2 and frame 2 as a batch of 1,
    # so CPU BLAS may take another GEMM path (blocking, threads): unit embeddings a, b then differ by
    # |a - b| ~ 1e-7..1e-6 (float32, 12 layers), bit-identical on some machines, 2e-8 apart on another.
    # - per_frame is cos(t, a) - cos(t, b) = t.(a - b): FIRST order in |a - b|, so 1e-6, not 1e-9;
    # - frame_consistency is 1 - cos(a, b) = |a - b|^2 / 2 for unit vectors (in float64): SECOND order,
    #   <= 5e-13 for |a - b| <= 1e-6, so 1e-9 stays legitimate (and catches a wrong pair or formula).
    assert static["frame_consistency"] == pytest.approx(1.0, abs=1e-9)
    assert static["per_frame"] == pytest.approx([static["per_frame"][0]] * 3, abs=1e-6)
    assert result["frame_consistency"] < 1 - 1e-4


def test_numpy_hwc_input_equals_tensor_input(scorer, frames, two_images):
    arr = frames[1:2].permute(0, 2, 3, 1).numpy()
    torch.testing.assert_close(scorer.image_embeddings(arr)[0], two_images[1], rtol=0, atol=1e-6)


def test_random_init_is_deterministic_under_seed(scorer, cat_text, monkeypatch):
    monkeypatch.setattr(cs, "_MODELS", {})  # bypass the in-process cache: really rebuild
    state = torch.get_rng_state()
    again = ClipScorer(pretrained=None, device="cpu", seed=0)
    other = ClipScorer(pretrained=None, device="cpu", seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched (fork_rng)
    assert again.model is not scorer.model
    for (name, a), b, c in zip(scorer.model.state_dict().items(), again.model.state_dict().values(),
                               other.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(scorer.model.visual.conv1.weight, other.model.visual.conv1.weight)
    assert (cat_text - other.text_embedding("a cat")).abs().max() > 1e-3


def test_model_is_cached_per_name_pretrained_device(scorer):
    assert ClipScorer(pretrained=None, device="cpu", seed=0, batch_size=7).model is scorer.model


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    assert a is not b
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_local_checkpoint_path_loads(scorer, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "clip.safetensors"  # a pickled .pt is refused (tests/runs/test_validation.py)
    save_file({k: v.contiguous() for k, v in scorer.model.state_dict().items()}, path)
    _assert_same_weights(ClipScorer(pretrained=str(path), device="cpu").model, scorer.model)


def test_openai_tag_loads_from_the_local_hugging_face_cache_without_network(scorer, tmp_path, monkeypatch):
    # The default path on an offline machine with a copied cache: laid out as huggingface_hub does.
    from safetensors.torch import save_file

    snapshot = tmp_path / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in scorer.model.state_dict().items()},
              str(snapshot / "open_clip_model.safetensors"))
    monkeypatch.setattr(cs, "_MODELS", {})  # keep this model out of the in-process cache of later tests
    monkeypatch.setattr(cs, "_hub_reachable", _no_network)
    monkeypatch.setattr("open_clip.pretrained.download_pretrained", _no_network)
    cached = ClipScorer(pretrained="openai", device="cpu", cache_dir=str(tmp_path))
    assert cached.quick_gelu
    _assert_same_weights(cached.model, scorer.model)


def test_openai_configuration_uses_quickgelu_and_plain_vit_b_32_does_not(scorer):
    import open_clip
    from open_clip.transformer import QuickGELU

    blocks = [*scorer.model.visual.transformer.resblocks, *scorer.model.transformer.resblocks]
    assert len(blocks) == 24 and all(isinstance(b.mlp.gelu, QuickGELU) for b in blocks)
    assert scorer.quick_gelu
    assert open_clip.get_pretrained_cfg(cs.DEFAULT_MODEL, cs.DEFAULT_PRETRAINED)["quick_gelu"] is True
    with torch.device("meta"):  # architecture only, no weights: instant
        plain = open_clip.create_model("ViT-B-32", device="meta")
    assert not any(isinstance(m, QuickGELU) for m in plain.modules())
    assert isinstance(plain.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)


def test_plain_vit_b_32_with_openai_weights_is_refused(monkeypatch):
    monkeypatch.setattr("open_clip.pretrained.download_pretrained", _no_network)
    with pytest.raises(ConfigError, match="ViT-B-32-quickgelu"):
        ClipScorer("ViT-B-32", pretrained="openai", device="cpu")


def _no_network(*args, **kwargs):
    raise AssertionError("tried to download")


def _assert_clear(err: StemError, *needles: str):
    msg = str(err)
    assert "\n" not in msg and msg.startswith("clip_score:")
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_missing_weights_fail_fast_when_the_download_fails(monkeypatch, tmp_path):
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def offline_fetch(cfg, cache_dir=None, **kw):
        calls.append(cfg)
        raise LocalEntryNotFoundError("Cannot find the requested files in the local cache")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(cs, "_hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr("open_clip.pretrained.download_pretrained", offline_fetch)
    start = time.monotonic()
    with pytest.raises(ClipWeightsError) as info:
        ClipScorer(pretrained="openai", device="cpu", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 5
    assert len(calls) == 1 and "vit_base_patch32_clip_224.openai" in calls[0]["hf_hub"]
    assert isinstance(info.value, StemError)
    _assert_clear(info.value, "ViT-B-32-quickgelu", "openai", "download failed", "open_clip", "cache",
                  "pretrained=/path/to/")


def test_missing_weights_offline_fail_without_trying_the_network(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(cs, "_hub_reachable", _no_network)
    monkeypatch.setattr("open_clip.pretrained.download_pretrained", _no_network)
    with pytest.raises(ClipWeightsError) as info:
        ClipScorer(pretrained="openai", device="cpu", cache_dir=str(tmp_path))
    _assert_clear(info.value, "HF_HUB_OFFLINE", "create_model('ViT-B-32-quickgelu', pretrained='openai')")


def test_unreachable_hub_fails_without_download(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(cs, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr("open_clip.pretrained.download_pretrained", _no_network)
    with pytest.raises(ClipWeightsError, match="unreachable"):
        ClipScorer(pretrained="openai", device="cpu", cache_dir=str(tmp_path))


def test_missing_local_checkpoint_and_unknown_tag(tmp_path):
    with pytest.raises(ClipWeightsError) as info:
        ClipScorer(pretrained=str(tmp_path / "nope.safetensors"), device="cpu")
    _assert_clear(info.value, "no such checkpoint file", "nope.safetensors")
    with pytest.raises(ConfigError, match="openai"):  # the message lists the model's tags
        ClipScorer(pretrained="not-a-tag", device="cpu")
    with pytest.raises(ConfigError, match="not an open_clip model"):
        ClipScorer("ViT-Q-99", pretrained=None, device="cpu")


@pytest.mark.parametrize("bad, needle", [
    (torch.full((2, 3, 32, 32), float("nan")), r"\(2, 3, 32, 32\).*NaN"),
    (torch.rand(2, 4, 32, 32), r"\(2, 4, 32, 32\)"),
    (torch.rand(3, 32, 32), r"\(3, 32, 32\)"),
    (torch.rand(0, 3, 32, 32), r"\(0, 3, 32, 32\)"),
    (torch.rand(2, 3, 32, 32) * 255, r"\[0, 1\]"),
    ((torch.rand(2, 3, 32, 32) * 255).to(torch.uint8), "uint8"),
])
def test_bad_frames_raise_value_error_naming_metric_and_shape(scorer, bad, needle):
    with pytest.raises(ValueError, match=f"clip_score.*{needle}"):
        scorer.score(bad, "a cat")


@pytest.mark.parametrize("prompts", [[], "", "   ", None, ["a cat", ""]])
def test_bad_prompts_raise_value_error(scorer, prompts):
    with pytest.raises(ValueError, match="clip_score.*prompt"):
        scorer.text_embeddings(prompts)


def test_long_prompt_warns_about_truncation(scorer):
    with pytest.warns(UserWarning, match="truncated"):
        scorer.text_embedding("a photo of a cat " * 30)
