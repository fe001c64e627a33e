"""Images: references, manifests, and the sources that serve their blobs."""
