"""The segment view: a FUSE file system in a process of its own that shows disks as segment files
(`nbd` kind, read from a backup job's NBD export) or stitches segment files back into one image
(`files` kind). `spec.py` is what the parent writes, `fs.py` the file systems, `__main__.py` the
process, `control.py` the parent's side (start, stop, clean up a leftover)."""
