import os

# OpenMP threads that spin while waiting make torch 10-30x slower as soon as
# another process competes for the cores (CI runners, shared dev boxes);
# passive waiting costs little when the machine is idle. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pipeline.cli import main  # noqa: E402

raise SystemExit(main())
