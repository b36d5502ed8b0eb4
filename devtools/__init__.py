"""Development helpers shared by tests/ and bench/ (neither imports the other): not part of the package."""
