"""Natural-language understanding: the intent model and the entity extractor."""
