from asc_dist.pack.cli import main

raise SystemExit(main())
