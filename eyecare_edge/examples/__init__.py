"""Small openly licensed sample images shipped with the package (see PROVENANCE.md)."""
