"""alignment: the library behind the `align` pipeline (config, artifacts, data, models, losses)."""

__version__ = "0.1.0"
