"""File formats: the reference server's JSON lines, and Memshift's own backup format."""
