"""`python -m vdiff_api` is the all-in-one `vdiff` command."""

from vdiff_api.launcher import main

main()
