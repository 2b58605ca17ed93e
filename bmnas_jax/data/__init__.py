"""Feature sets: the data object every trainer takes, shards, datasets and backbones."""
