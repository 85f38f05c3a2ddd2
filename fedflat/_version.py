"""The package version (its own module, so that the runtime can read it without importing
the package's front door, which imports the runtime lazily)."""

__version__ = "0.1.0"
