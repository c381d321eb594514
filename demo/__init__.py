"""The demo: an embedded broker, SQLite, the emulator and a real worker on one laptop."""
