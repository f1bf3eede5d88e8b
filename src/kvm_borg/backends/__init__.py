"""Repository backends, one plugin package per repository ``type:`` (`borg`, `restic`).

Each package's ``__init__`` implements the ``kvm_borg_repository_backend`` hook and returns an
object that follows ``kvm_borg.models.RepositoryBackend``; inside, its pure argv builders
(`commands`), its output parsers and its repository class are modules of their own. Shared by
both: `ssh_options` (the ssh options every repository ssh gets) and `tool_commands` (running a
repository's own tool by hand: `kvm-borg borg|restic -- ARGS`, `kvm-borg key export`).
"""
