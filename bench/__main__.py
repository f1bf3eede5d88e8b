"""`python -m bench`: the whole benchmark suite (bench/suite.py); `python -m bench fixed-cost [...]`: only
the fixed-cost case (bench/fixed_cost.py); `python -m bench incremental [...]`: the changed-block case,
bitmap vs snapshot method (bench/incremental.py); `python -m bench jobs [...]`: parallel domains, --jobs 2 vs
--jobs 1 (bench/jobs.py); `python -m bench fleet [...]`: many small domains with `--all`, the per-domain cost
beyond the plain sequence (bench/fleet.py); `python -m bench restore [...]`: full and live restore against borg's
and restic's own tools (bench/restore.py)."""

import sys

if sys.argv[1:2] == ["fixed-cost"]:
    from bench.fixed_cost import main

    raise SystemExit(main(sys.argv[2:]))
if sys.argv[1:2] == ["jobs"]:
    from bench.jobs import main

    raise SystemExit(main(sys.argv[2:]))
if sys.argv[1:2] == ["fleet"]:
    from bench.fleet import main

    raise SystemExit(main(sys.argv[2:]))
if sys.argv[1:2] == ["restore"]:
    from bench.restore import main

    raise SystemExit(main(sys.argv[2:]))
if sys.argv[1:2] == ["incremental"]:
    from bench.incremental import main

    raise SystemExit(main(sys.argv[2:]))

from bench.suite import main  # noqa: E402

raise SystemExit(main())
