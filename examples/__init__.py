"""Small programs that use the service from outside, each run by a test."""
