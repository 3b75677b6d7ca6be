"""Hooks into other tools' model loaders: ``import dlsn.integrations.spandrel`` (needs the ``[spandrel]`` extra)."""
