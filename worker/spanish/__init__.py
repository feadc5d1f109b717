"""Spanish text handling for speech: regional variant detection and text normalisation."""
