"""The other editing methods of the paper's Table 2, rebuilt on the project's pieces: Tune-A-Video (one-shot
tuning), Pix2Video (depth-conditioned SD 2, anchor and previous-frame attention) and Text2Video-Zero
(ControlNet depth, cross-frame attention to the first frame). docs/BASELINES.md describes each."""
