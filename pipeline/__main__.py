from pipeline.cli import main  # main() sets the environment guards before torch loads

raise SystemExit(main())
