"""Zero-shot video editing on the inverted latents of any inversion (spec/EDITING.md).

- tokenflow: TokenFlow (plug-and-play variant); on STEM latents, the paper's STEM-TokenFlow.
- fatezero: FateZero with attention fusion; on STEM latents and maps, the paper's STEM-FateZero.
- baselines: the other Table 2 methods (Tune-A-Video, Pix2Video, Text2Video-Zero), docs/BASELINES.md.
"""

from stem.editing.base import Edit, Editor
from stem.editing.fatezero import FateZeroEditor
from stem.editing.tokenflow import TokenFlowEditor

__all__ = ["Edit", "Editor", "FateZeroEditor", "TokenFlowEditor"]
