from nerd.cli import main

raise SystemExit(main())
