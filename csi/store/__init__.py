"""The node's store: state (SQLite), unpacked layers, and (later) blobs and GC."""
