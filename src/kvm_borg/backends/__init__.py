"""Repository backends, one plugin module per repository ``type:`` (borg, restic).

Each module implements the ``kvm_borg_repository_backend`` hook and returns an object that
follows ``kvm_borg.models.RepositoryBackend``; its argv builders live beside it as pure functions.
"""
