"""The canonical mesh model: frozen, indexed, built from the whole config store."""
