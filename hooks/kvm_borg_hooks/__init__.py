"""Ready-to-use kvm-borg plugins, installed with kvm-borg. Enable one by module name in the config:

    plugins: [kvm_borg_hooks.webhook, kvm_borg_hooks.prefreeze]

- `kvm_borg_hooks.webhook`: POST a JSON run summary, healthchecks.io-style start/success/fail pings
  (config key `webhook:`);
- `kvm_borg_hooks.prefreeze`: run commands inside a guest through its QEMU agent right before the
  snapshot and right after it (config key `prefreeze:`).

See docs/operations.md for configuration snippets and docs/plugins.md for the hooks they use.
"""
