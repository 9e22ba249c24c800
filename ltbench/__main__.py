from ltbench import malloc

malloc.reexec()  # first: glibc reads its malloc tunables only when a process starts (ltbench/malloc.py)

from ltbench.cli import main  # noqa: E402

raise SystemExit(main())
