from vdiff_worker.cli import main

main()
