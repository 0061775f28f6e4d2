"""`python -m triofwd` is the same program as the `triofwd` command."""

from ._cli import main

raise SystemExit(main())
