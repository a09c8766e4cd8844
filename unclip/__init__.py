"""unclip: DALL-E 2 (unCLIP) text-to-image, trained and served as gRPC microservices.

Kept import-light on purpose: the client SDK lives under this package and must not pull in torch.
"""

__version__ = "0.1.0"
