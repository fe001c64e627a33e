"""Mounting: mounts as data (spec), one executor (syscalls), the mount table (mountinfo)."""
