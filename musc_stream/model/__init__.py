"""The math and the models: backbones, MuSc scoring, patch memory. No file or network I/O here."""
