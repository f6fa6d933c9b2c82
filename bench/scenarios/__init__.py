"""The measured runs, one module per kind; each starts its own servers and returns its part of the result."""
