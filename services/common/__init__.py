"""The server runtime shared by the three services, and the client channel factory."""
