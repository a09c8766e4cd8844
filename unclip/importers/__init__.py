"""Importers: weights in other formats converted into unclip weights directories."""
