from qubrid_lab.cli import main

raise SystemExit(main())
