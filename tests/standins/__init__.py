"""Local stand-ins of outside systems, held to their recorded APIs (shared/reference)."""
