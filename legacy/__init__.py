"""Older model families and APIs, kept apart as a compatibility layer on top of ``models`` and
``mcore``. Nothing lives here yet: every supported family is in ``models/``."""
