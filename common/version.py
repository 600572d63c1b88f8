"""The toolkit version, recorded in every cache's provenance and every evaluation file."""
__version__ = "0.2.0"
