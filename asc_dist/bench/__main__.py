from asc_dist.bench import main

raise SystemExit(main())
