"""`python -m kit.cli`: the kit command (what torchrun and the subprocess tests start)."""

from kit.cli import main

main()
