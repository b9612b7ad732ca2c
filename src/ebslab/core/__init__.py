"""Layer 0, core: the config tree, errors, durable files, folder locks, metrics and the one run-folder reader. Imports nothing of ebslab. See ARCHITECTURE.md."""
