"""The package version (recorded in every manifest and in a streamed run's resume fingerprint)."""

__version__ = "0.1.0"
