"""The HTTP/WebSocket layer: the only part of mangwale that imports the web framework."""
