"""Reading: image decoding and pixel limits, large-image regions, videos/cameras/hot folders, input
expansion, labelled data and manifest layouts, file integrity."""
