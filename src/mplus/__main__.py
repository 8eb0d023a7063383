from mplus.apps.cli import main

raise SystemExit(main())
