"""Inversion methods and everything they install on the UNet's self-attention (`attn1`): the 1-, 2- and
all-frame context processors, EM of the K bases (paper Eq. 8-11), STEM self-attention (Eq. 7), adaptive K,
FateZero's spatio-temporal attention, the frame-sharded inversion loop. `methods` holds the classes."""
