from cgguard.cli import main

raise SystemExit(main())
