"""picochat: a small ChatGPT-style system you can read, run, train and own."""
__version__ = "0.1.0"
