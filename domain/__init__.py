"""The order domain: pure Python, standard library only."""
