"""`kvm-borg config generate|validate`."""

from __future__ import annotations

from kvm_borg.actions.common import Context, backend_for, check_passphrase_file


def print_sample() -> int:
    """Print the commented sample configuration generated from the schema (valid as it stands); return 0."""
    from kvm_borg import config_docs

    print(config_docs.sample_config(*config_docs.documented_schema()), end="")
    return 0


def validate_config(ctx: Context) -> str:
    """Given a Context (the file already parsed and validated), check plugins and repositories; return a summary line."""
    settings = ctx.settings
    for repo in settings.repositories:
        backend_for(ctx, repo)
        check_passphrase_file(repo)
    where = settings.config_path or "embedded default"
    return f"{where}: valid ({len(settings.repositories)} repositories, {len(settings.plugins)} extra plugins)"


def generate_from_args(_ctx: None, _args) -> int:
    """Run `kvm-borg config generate` (needs no settings): print the sample configuration; return 0."""
    return print_sample()


def validate_from_args(ctx: Context, _args) -> int:
    """Given the Context (its file already parsed and validated), run `kvm-borg config validate`; return 0."""
    print(validate_config(ctx))
    return 0

