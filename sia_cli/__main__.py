from sia_cli.cli import main

main()
