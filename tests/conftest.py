"""Shared fixtures. Servers are started by the tests themselves, on 127.0.0.1 only."""

from __future__ import annotations

import pytest

# Few denoising steps: the tests check plumbing and determinism, not image quality.
FAST_STEPS = dict(prior_steps=3, decoder_steps=3, upsampler_steps=2)


@pytest.fixture(scope="session")
def local_stages():
    """The four engines with the shipped weights, loaded once per test session."""
    from unclip.local import LocalStages

    return LocalStages.load()
