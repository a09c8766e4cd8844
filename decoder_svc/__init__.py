"""The diffusion decoder (stage 3) and upsampler (stage 4) services."""
