from choreo.cli import main

main()
