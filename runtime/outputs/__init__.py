"""Writing: result records (JSONL/CSV), output guards (locks, free space, resume), the audit log,
safe names, overlays, plots and the HTML report."""
