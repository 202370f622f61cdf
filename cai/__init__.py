"""cai: a constitutional-AI self-improvement library.

Importing this package is cheap: it pulls no torch, transformers or celery. Heavy
imports live inside the functions that need them (models, generation, training).
"""

__version__ = "0.1.0"
