"""modeconn: GPT-2 pretraining and probing for optimizer-induced mode connectivity."""

__version__ = "0.1.0"
