"""`kvm-borg config generate|validate`."""

from __future__ import annotations

from importlib import resources

from kvm_borg.actions.common import Context, backend_for, check_passphrase_file


def sample_config() -> str:
    """Return the commented sample configuration (valid as it stands)."""
    return resources.files("kvm_borg").joinpath("config_sample.yaml").read_text(encoding="utf-8")


def validate_config(ctx: Context) -> str:
    """Given a Context (the file already parsed and validated), check plugins and repositories; return a summary line."""
    settings = ctx.settings
    for repo in settings.repositories:
        backend_for(ctx, repo)
        check_passphrase_file(repo)
    where = settings.config_path or "embedded default"
    return f"{where}: valid ({len(settings.repositories)} repositories, {len(settings.plugins)} extra plugins)"
