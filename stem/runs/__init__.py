"""What makes one job reproducible and safe: invert (cached) then reconstruct or edit (`reconstruction`,
`edit`), the content-hashed cache and the version digest of the code its latents depend on, the run
directory, the checks before any model work, the benchmark scripts' shared pieces."""
