"""The inversion cache key of one fixed computation, pinned by its literal value.

A key names a cached trajectory: it must depend on the inputs and the method's settings only, never on
where the code lives (module paths, class names). Moving a module, or renaming a package, must leave this
key unchanged, so a cache filled before the move keeps hitting. The value below was computed before the
package layout changed. It changes only with a deliberate bump of the inversion cache version (or a change
of the tiny model, the synthetic clip, or the key's parts): then update it with that change.
"""

from __future__ import annotations

from stem.data.synthetic import camera_pan
from stem.inversion.methods import STEMInversion
from stem.runs.reconstruction import invert_video

PINNED_KEY = "94be53b044614f661391e931"  # computed on the flat layout, before the move


def test_inversion_cache_key_is_the_pinned_value(tiny_model):
    video = camera_pan(n_frames=2, width=64, height=64)
    method = STEMInversion(num_bases=4, n_iters=1, num_steps=2, excess_bases="clamp")
    assert invert_video(tiny_model, video, method, progress=False).key == PINNED_KEY
