"""Dataset layer: URIs, layout discovery, validation, named datasets, transforms."""
