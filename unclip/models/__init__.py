"""Neural networks of unCLIP: the diffusion prior, the decoder / upsampler UNets and their building blocks."""
