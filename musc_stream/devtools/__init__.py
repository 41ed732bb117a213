"""Tools for development and demos, not the production path: a local broker, a camera stand-in, the demo."""
