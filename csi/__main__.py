"""`python -m csi` is the `strata` command."""

from csi.cli import main

raise SystemExit(main())
