from fastgrpo.tasks.routing.data import main

raise SystemExit(main())
