"""The `memshift` command: serving, the client commands, the admin commands, import and export."""
