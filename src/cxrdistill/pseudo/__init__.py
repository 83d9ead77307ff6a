"""pseudo package."""
