"""The Stable Diffusion pieces every method uses: the DDIM step and schedule (paper Eq. 3), VAE encode and
decode, prompt encoding, model builders and loading, device and dtype. Imports `stem.core` only."""
