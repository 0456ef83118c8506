"""Bytes in object storage: filesystems from URLs, input listing, atomic commits, corpus and dataset I/O.

Kept apart from Ray and models so that every storage behaviour can be tested against a real S3 server.
"""
