"""The receiving side: listeners, TLS, and the asyncio adapter around smtp.server."""
