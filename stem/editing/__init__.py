"""Zero-shot video editing on the inverted latents of any inversion (spec/EDITING.md).

- tokenflow: TokenFlow (plug-and-play variant); on STEM latents, the paper's STEM-TokenFlow.
"""

from stem.editing.base import Edit, Editor
from stem.editing.tokenflow import TokenFlowEditor

__all__ = ["Edit", "Editor", "TokenFlowEditor"]
