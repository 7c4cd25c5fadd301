"""The version, at the bottom of the house: builds, tables and reports record it."""

__version__ = "0.1.0"
