"""`python -m inferd.cli ...`: the same as the `inferd` command."""

from inferd.cli.main import main

raise SystemExit(main())
