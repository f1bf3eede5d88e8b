"""The flows kvm-borg's verbs share: one backup of a domain (backup.py), reading an archive back (archive.py)."""
