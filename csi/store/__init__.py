"""The node's store: state (SQLite), blobs, unpacked layers, GC, and what they report."""
