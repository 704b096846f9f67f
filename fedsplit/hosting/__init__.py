"""Hosting workers: serving them on the data plane, reaching them from other organisations, and
the processes they live in."""
