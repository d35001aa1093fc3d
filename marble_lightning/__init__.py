"""marble-lightning."""
