"""Data: the embedded world, the emoji set, curation, and the datasets the trainer reads."""
