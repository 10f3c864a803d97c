from asc_dist.table1 import main

raise SystemExit(main())
