"""A line's decisions: the streaming engine (window, memory, scoring order), threshold, changeover, regions."""
