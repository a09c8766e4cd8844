"""The CLIP encoder service (stage 1)."""
