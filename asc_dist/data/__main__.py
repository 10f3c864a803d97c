from asc_dist.data.cli import main

raise SystemExit(main())
