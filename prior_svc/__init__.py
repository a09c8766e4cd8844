"""The diffusion prior service (stage 2)."""
