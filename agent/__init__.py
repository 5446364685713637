"""Edge Model Agent: signed model bundles, hot-swapped inference runtimes, a local inference API."""

__version__ = "0.1.0"
