from hestia.cli import main

raise SystemExit(main())
