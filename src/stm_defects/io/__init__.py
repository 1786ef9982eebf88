"""Reading and writing: scan files of every format, JSON/PNG/CSV, model folders."""
