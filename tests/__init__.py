"""dartmamba tests (a package, so helpers import by name, not through sys.path)."""
