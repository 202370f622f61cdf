"""Training stages (3, 6, 7): thin over TRL, peft and bitsandbytes. See recipe.py for settings."""
