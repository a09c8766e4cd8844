"""The public ImageService: chains the stage services over gRPC."""
