from prefrun.cli import main

main()
