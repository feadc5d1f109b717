"""Where outputs go and inputs come from. One file per storage kind, each a `Storage`."""
