"""Personal data at rest: which columns hold it, how they are encrypted, kept and erased."""
