"""Plugins the tests load through the config's `plugins:` key, exactly as a user's plugin would be."""
