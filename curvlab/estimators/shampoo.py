"""Placeholder: filled in by the issue-3 work."""
