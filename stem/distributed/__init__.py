"""Frame-sharded jobs: which process holds which frames (`frame_slices`), the collectives the attention
processors need, torchrun's and submitit's launch variables. Imports `stem.core` only."""
