"""The migration engine and what it keeps: the migration state and its phase table, the placement of scopes, the
control store (SQLite or PostgreSQL) and a fleet's sync over it, the stores a state names, and the parts that move
memory between them (docs/design.md, "The migration engine in parts")."""
