"""Training: supervised (resumable, deterministic); path and SaiT training come next."""
