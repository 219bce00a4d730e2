"""Reference integrations."""
