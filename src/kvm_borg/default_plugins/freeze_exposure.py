"""Built-in plugin: complete a journal entry whose frozen files `kvm-borg freeze` exposed (its owner,
kvm_borg.pipeline.exposure.OWNER): first withdraw the exposure, then let the entry's FrozenSource
plugin release it like any other, then drop the exposure record. Used by `kvm-borg recover` and
`kvm-borg thaw` alike; works whichever source froze the domain."""

from kvm_borg.models import RecoveryReport
from kvm_borg.hookspecs import hookimpl
from kvm_borg.pipeline import exposure


@hookimpl(wrapper=True)
def kvm_borg_recover_entry(entry, connection, settings):
    """Around the source's recovery of an exposed entry: unmount and remove the exposure before, merge
    the reports and remove the exposure record after; other entries pass through untouched."""
    if entry.owner != exposure.OWNER:
        return (yield)
    record = exposure.record_for(settings, entry.uuid)
    report = RecoveryReport(entry.domain)
    if record is not None:
        exposure.withdraw(record, report)
    released = yield
    if released is None:  # no source plugin completed it: keep the record for the next attempt
        return None
    report.actions.extend(released.actions)
    report.warnings.extend(released.warnings)
    if record is not None:
        exposure.remove_record(settings, record["uuid"])
    return report
