"""`python -m dus` is the same as the `dus` command (useful under `accelerate launch -m dus`)."""

from dus.cli import main

main()
