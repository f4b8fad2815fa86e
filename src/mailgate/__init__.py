"""mailgate: an outgoing mail service for an organisation's network."""

__version__ = "0.1.0"
