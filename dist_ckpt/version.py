"""The package version, in a module of its own: modules that record it (the writer's
``COMMITTED``, ``dist-ckpt --version``) import it without importing the package's lazy API."""

__version__ = "0.1.0"
