"""Reward service. Kept free of imports: the client must load without torch."""
